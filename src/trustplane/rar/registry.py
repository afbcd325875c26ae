"""The ``authorization_details`` type registry (RFC 9396): types are JSON Schema files, not code.

Each ``<type>.json`` in the shipped ``types`` directory (``trade_instruction``,
``settlement_instruction``) and in ``TRUSTPLANE_AUTHORIZATION_DETAILS_TYPES_DIR`` (same name
overrides) defines one type: Draft 2020-12 plus the named checks of :mod:`trustplane.rar.formats`,
and the ``narrowing`` annotation that :meth:`AuthorizationDetailsRegistry.covers` reads.

RFC 9396 §5: malformed details, an unknown type, or a type the client did not register
(``authorization_details_types``, §10) are refused with ``invalid_authorization_details``. The
refusal names the problem, but what the client sent is shown only through :func:`_refusal`: RFC 6749
§5.2 allows no quote, backslash, control or non-ASCII character in ``error_description``. A string
holding NUL (a ``\u0000`` escape, which the form's own NUL check cannot see) is refused: no type
allows it and PostgreSQL's ``text`` cannot hold it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import orjson
from jsonschema import SchemaError
from jsonschema.exceptions import best_match

from trustplane.errors import InvalidAuthorizationDetailsError, wire_description
from trustplane.rar.formats import TypeValidator, format_checker

#: Caps applied before any schema work (joserfc style): nothing legitimate is larger.
MAX_TEXT = 16 * 1024
MAX_DETAILS = 16
TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class RegisteredClient(Protocol):
    """What the registry reads of a client (a :class:`trustplane.clients.model.Client`): its registered
    metadata, whose ``authorization_details_types`` are the only types it may request (RFC 9396 §5)."""

    @property
    def metadata(self) -> Mapping[str, Any]: ...


class RegistryConfigError(ValueError):
    """A type file is unreadable or not a valid schema for its name; the message names the file."""


@dataclass(frozen=True)
class DetailsType:
    name: str
    title: str
    description: str
    schema: dict[str, Any]
    validator: Any


class AuthorizationDetailsRegistry:
    def __init__(self, types: dict[str, DetailsType]) -> None:
        self.types = types

    @classmethod
    def load(cls, directory: Path | None = None) -> AuthorizationDetailsRegistry:
        files: dict[str, tuple[str, str]] = {}
        shipped = resources.files("trustplane.rar").joinpath("types")
        for entry in shipped.iterdir():
            if entry.name.endswith(".json"):
                files[entry.name[:-5]] = (
                    entry.read_text(encoding="utf-8"),
                    f"(shipped) {entry.name}",
                )
        if directory is not None:
            if not directory.is_dir():
                raise RegistryConfigError(f"{directory} is not a directory")
            for path in sorted(directory.glob("*.json")):
                files[path.stem] = (path.read_text(encoding="utf-8"), str(path))
        return cls({name: _load_type(name, text, where) for name, (text, where) in files.items()})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.types))

    def validate(
        self, raw: str | Sequence[Any] | None, client: RegisteredClient
    ) -> tuple[dict[str, Any], ...]:
        """Parse and check the ``authorization_details`` request parameter for ``client``.

        ``None`` or an empty string (parameter absent) is ``()``. Raises
        :class:`InvalidAuthorizationDetailsError` naming the first problem."""
        if raw is None or raw == "":
            return ()
        items = _parse(raw)
        allowed = frozenset(client.metadata.get("authorization_details_types", ()))
        return tuple(self._check(index, item, allowed) for index, item in enumerate(items))

    def _check(self, index: int, item: Any, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise _refusal(f"authorization_details[{index}] must be an object with a string 'type'")
        kind = self.types.get(item["type"])
        if kind is None:
            raise _refusal(f"authorization_details[{index}]: unknown type {item['type'][:64]!r}")
        if kind.name not in allowed:
            raise _refusal(
                f"authorization_details[{index}]: the client is not registered for type {kind.name!r}"
            )
        error = best_match(kind.validator.iter_errors(item))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(object)"
            raise _refusal(
                f"authorization_details[{index}] ({kind.name}) {where}: {error.message[:200]}"
            )
        return item

    def covers(
        self, granted: Sequence[dict[str, Any]], requested: Sequence[dict[str, Any]]
    ) -> bool:
        """True if every requested detail is within some granted detail of the same type.

        Structural narrowing, guided by the type's schema: a member the grant restricts must be
        present in the request and within it (arrays: subset; ``"narrowing": "maximum"`` numbers:
        less or equal; ``"minimum"``: greater or equal; objects: member by member; anything else:
        equal). A member the grant leaves out is unrestricted. Unknown types never cover."""
        return all(
            any(self._covers_one(g, r) for g in granted if g.get("type") == r.get("type"))
            for r in requested
        )

    def narrow(
        self,
        raw: str | Sequence[Any] | None,
        client: RegisteredClient,
        granted: Sequence[dict[str, Any]],
    ) -> tuple[dict[str, Any], ...]:
        """RFC 9396 §6.2: details requested against an existing grant (a refresh, a token exchange)
        must be valid and within what was granted. Absent means "all of it"."""
        requested = self.validate(raw, client)
        if not requested:
            return tuple(granted)
        for index, detail in enumerate(requested):
            if not self.covers(granted, [detail]):
                raise _refusal(
                    f"authorization_details[{index}] ({detail['type']}) exceeds what was granted"
                )
        return requested

    def _covers_one(self, granted: dict[str, Any], requested: dict[str, Any]) -> bool:
        kind = self.types.get(str(requested.get("type")))
        return kind is not None and _within(kind.schema, granted, requested)

    def describe(self, detail: dict[str, Any]) -> list[tuple[str, str]]:
        """Label/value rows in business language (schema titles), for the consent page and CLI."""
        kind = self.types.get(str(detail.get("type")))
        if kind is None:
            return [("Type", str(detail.get("type")))]
        rows = [("Type", kind.title)]
        for name, sub in kind.schema.get("properties", {}).items():
            if name != "type" and name in detail:
                rows.append((str(sub.get("title", name)), _display(sub, detail[name])))
        return rows

    def digest(self, details: Sequence[dict[str, Any]]) -> str | None:
        """SHA-256 of the canonical JSON (sorted keys), for audit records; None for no details."""
        if not details:
            return None
        return hashlib.sha256(orjson.dumps(list(details), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _refusal(description: str) -> InvalidAuthorizationDetailsError:
    return InvalidAuthorizationDetailsError(wire_description(description)[:300])


def _holds_nul(value: Any) -> bool:
    """True if a string anywhere in ``value`` (a member name included) holds NUL."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _load_type(name: str, text: str, where: str) -> DetailsType:
    if not TYPE_NAME.match(name):
        raise RegistryConfigError(f"{where}: type name {name!r} must match {TYPE_NAME.pattern}")
    try:
        schema = orjson.loads(text)
        TypeValidator.check_schema(schema)
    except (orjson.JSONDecodeError, SchemaError) as exc:
        raise RegistryConfigError(f"{where}: not a valid JSON Schema: {str(exc)[:300]}") from None
    type_rule = schema.get("properties", {}).get("type", {}) if isinstance(schema, dict) else {}
    if type_rule.get("const") != name or "type" not in schema.get("required", []):
        raise RegistryConfigError(
            f"{where}: the schema must require 'type' with \"const\": {name!r}"
        )
    validator = TypeValidator(schema, format_checker=format_checker())
    title = str(schema.get("title", name))
    return DetailsType(name, title, str(schema.get("description", "")), schema, validator)


def _parse(raw: str | Sequence[Any]) -> Sequence[Any]:
    if isinstance(raw, str):
        if len(raw) > MAX_TEXT:
            raise _refusal(f"authorization_details exceeds {MAX_TEXT} characters")
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _refusal("authorization_details is not valid JSON") from None
    if not isinstance(raw, list) or not raw:
        raise _refusal("authorization_details must be a non-empty JSON array of objects")
    if len(raw) > MAX_DETAILS:
        raise _refusal(f"at most {MAX_DETAILS} authorization_details")
    if _holds_nul(raw):
        raise _refusal("authorization_details must not hold a NUL character")
    return raw


def _within(schema: dict[str, Any], granted: Any, requested: Any) -> bool:
    narrowing = schema.get("narrowing")
    if isinstance(granted, dict) and isinstance(requested, dict):
        props = schema.get("properties", {})
        return all(
            key in requested and _within(props.get(key, {}), value, requested[key])
            for key, value in granted.items()
        )
    if isinstance(granted, list) and isinstance(requested, list):
        allowed = {_canonical(v) for v in granted}
        return all(_canonical(v) in allowed for v in requested)
    numbers = (int, float)
    if (
        narrowing in ("maximum", "minimum")
        and isinstance(granted, numbers)
        and isinstance(requested, numbers)
    ):
        if isinstance(granted, bool) or isinstance(requested, bool):
            return False
        return requested <= granted if narrowing == "maximum" else requested >= granted
    return bool(type(granted) is type(requested) and granted == requested)


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _display(schema: dict[str, Any], value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    units = schema.get("minorUnitsOf")
    if isinstance(value, dict) and isinstance(units, dict):
        return _money(value, units)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return "; ".join(
            f"{props.get(k, {}).get('title', k)}: {_display(props.get(k, {}), v)}"
            for k, v in value.items()
        )
    return str(value)


def _money(value: dict[str, Any], units: dict[str, str]) -> str:
    digits = value.get(units["minor_units"], 0)
    amount = next(
        (v for k, v in value.items() if isinstance(v, int) and k not in units.values()), 0
    )
    whole = (
        f"{Decimal(amount).scaleb(-digits):,.{digits}f}" if isinstance(digits, int) else str(amount)
    )
    return f"{value.get(units['currency'], '')} {whole}"


@functools.lru_cache(maxsize=8)
def known_types(directory: Path | None) -> frozenset[str]:
    """Type names available with this configuration (client metadata validation)."""
    return frozenset(AuthorizationDetailsRegistry.load(directory).names)
