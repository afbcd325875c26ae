"""Checks JSON Schema cannot express, exposed to the type schemas by name so that the schema file
stays the whole configuration of a type.

Formats (``"format": "isin"``): ``isin`` (ISO 6166 with its check digit), ``mic`` (an ISO 10383
market identifier code that exists and is active), ``iso4217-currency`` (an active ISO 4217 alphabetic
code), ``lei`` (ISO 17442 with check digits), ``bic`` (ISO 9362).

Keyword ``minorUnitsOf`` on an object: ``{"currency": "<member>", "minor_units": "<member>"}``; the
minor-units member must equal the currency's ISO 4217 exponent (codes without minor units, such as
XAU, take 0: amounts are in whole units).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterator
from typing import Any

import iso4217
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators
from stdnum import bic, isin, lei


def is_mic(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 4 or not value.isalnum() or not value.isupper():
        return False
    return value in _active_mics()


@functools.cache
def _active_mics() -> frozenset[str]:
    # imported on the first MIC check: the registry's data module costs ~0.3 s at import, which
    # every CLI command (none of which checks a MIC) would otherwise pay
    import iso10383

    active = iso10383.Status.active
    return frozenset(m.value.mic for m in iso10383.MIC if m.value.status is active)


def currency_exponent(code: str) -> int | None:
    """The ISO 4217 exponent of ``code``; None if the code is unknown (0 when it has no minor unit)."""
    if len(code) != 3 or not code.isupper():
        return None
    try:
        currency: enum.Enum = iso4217.Currency(code)
    except ValueError:
        return None
    exponent = getattr(currency, "exponent", None)
    return int(exponent) if exponent is not None else 0


def _is_currency(value: object) -> bool:
    return isinstance(value, str) and currency_exponent(value) is not None


def _stdnum(module: Any) -> Any:
    def check(value: object) -> bool:
        # stdnum normalises case and spaces; the wire form must already be the compact upper form
        return isinstance(value, str) and value == value.upper().strip() and module.is_valid(value)

    return check


def format_checker() -> FormatChecker:
    checker = FormatChecker()
    checker.checks("isin")(_stdnum(isin))
    checker.checks("lei")(_stdnum(lei))
    checker.checks("bic")(_stdnum(bic))
    checker.checks("mic")(is_mic)
    checker.checks("iso4217-currency")(_is_currency)
    return checker


def _minor_units_of(
    validator: Any, spec: dict[str, str], instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not isinstance(instance, dict):
        return
    code, units = instance.get(spec["currency"]), instance.get(spec["minor_units"])
    if not isinstance(code, str) or not isinstance(units, int):
        return  # "required"/"type" report these
    exponent = currency_exponent(code)
    if exponent is not None and units != exponent:
        yield ValidationError(
            f"{spec['minor_units']} must be {exponent} for {code} (ISO 4217), not {units}"
        )


#: Draft 2020-12 plus the ``minorUnitsOf`` keyword.
TypeValidator: Any = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {"minorUnitsOf": _minor_units_of}
)
