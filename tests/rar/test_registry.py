"""RFC 9396 authorization_details: every refusal is ``invalid_authorization_details`` (§5) with a
message naming the problem; types come from JSON Schema files, so a new type is configuration."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from trustplane.clients.model import Client, ClientStatus
from trustplane.errors import InvalidAuthorizationDetailsError
from trustplane.rar.registry import MAX_DETAILS, AuthorizationDetailsRegistry, RegistryConfigError

TRADE: dict[str, Any] = {
    "type": "trade_instruction",
    "actions": ["create_order", "cancel_order"],
    "accounts": ["ACC-1"],
    "instrument_classes": ["bond"],
    "isins": ["US0378331005", "DE0001102580"],
    "venues": ["XLON", "XETR"],
    "sides": ["buy", "sell"],
    "max_notional": {"amount": 500_000_000, "currency": "EUR", "minor_units": 2},
}
SETTLEMENT: dict[str, Any] = {
    "type": "settlement_instruction",
    "actions": ["submit"],
    "accounts": ["SAFE-9"],
    "methods": ["dvp"],
    "places_of_settlement": ["DAKVDEFF"],
    "counterparties": ["5493001KJTIIGC8Y1R12"],
    "max_amount": {"amount": 100_000, "currency": "JPY", "minor_units": 0},
}


@pytest.fixture(scope="module")
def registry() -> AuthorizationDetailsRegistry:
    return AuthorizationDetailsRegistry.load()


def client(*types: str) -> Client:
    meta = {"lei": "5493001KJTIIGC8Y1R12", "authorization_details_types": list(types)}
    return Client.build("c1", meta, ClientStatus.ACTIVE)


BOTH = client("trade_instruction", "settlement_instruction")


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``base`` with ``a.b`` set to ``value`` (``...`` deletes it)."""
    out = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    target = out
    for name in parents:
        target = target[name]
    if value is ...:
        del target[leaf]
    else:
        target[leaf] = value
    return out


def test_shipped_types(registry: AuthorizationDetailsRegistry) -> None:
    assert registry.names == ("settlement_instruction", "trade_instruction")


def test_valid_details_from_json_text_and_list(registry: AuthorizationDetailsRegistry) -> None:
    assert registry.validate(json.dumps([TRADE, SETTLEMENT]), BOTH) == (TRADE, SETTLEMENT)
    assert registry.validate([TRADE], BOTH) == (TRADE,)


@pytest.mark.parametrize("absent", [None, ""])
def test_absent_parameter_is_no_details(
    registry: AuthorizationDetailsRegistry, absent: Any
) -> None:
    assert registry.validate(absent, BOTH) == ()


def test_isin_alone_or_instrument_class_alone_suffices(
    registry: AuthorizationDetailsRegistry,
) -> None:
    assert registry.validate([with_(TRADE, "instrument_classes", ...)], BOTH)
    assert registry.validate([with_(TRADE, "isins", ...)], BOTH)


def test_currency_without_minor_units_takes_zero(registry: AuthorizationDetailsRegistry) -> None:
    gold = with_(TRADE, "max_notional", {"amount": 400, "currency": "XAU", "minor_units": 0})
    assert registry.validate([gold], BOTH)


NEGATIVES: list[tuple[str, Any, str]] = [
    ("malformed JSON", '[{"type": "trade_instruction",', r"not valid JSON"),
    ("not an array", json.dumps(TRADE), r"non-empty JSON array"),
    ("empty array", "[]", r"non-empty JSON array"),
    ("element not an object", '["trade_instruction"]', r"\[0\] must be an object"),
    ("type missing", [with_(TRADE, "type", ...)], r"\[0\] must be an object with a string 'type'"),
    ("type not a string", [with_(TRADE, "type", 7)], r"string 'type'"),
    (
        "unknown type",
        [with_(TRADE, "type", "payment_initiation")],
        r"unknown type 'payment_initiation'",
    ),
    ("too many", [TRADE] * (MAX_DETAILS + 1), rf"at most {MAX_DETAILS}"),
    ("too large", "[" + " " * 20_000 + "]", r"exceeds"),
    (
        "bad ISIN check digit",
        [with_(TRADE, "isins", ["US0378331006"])],
        r"isins/0: 'US0378331006' is not a 'isin'",
    ),
    ("lower-case ISIN", [with_(TRADE, "isins", ["us0378331005"])], r"is not a 'isin'"),
    ("unknown MIC", [with_(TRADE, "venues", ["ZZZZ"])], r"venues/0: 'ZZZZ' is not a 'mic'"),
    (
        "bad currency",
        [with_(TRADE, "max_notional.currency", "EUX")],
        r"max_notional/currency: 'EUX' is not a 'iso4217-currency'",
    ),
    (
        "wrong minor units EUR",
        [with_(TRADE, "max_notional.minor_units", 0)],
        r"minor_units must be 2 for EUR \(ISO 4217\), not 0",
    ),
    (
        "wrong minor units JPY",
        [with_(SETTLEMENT, "max_amount.minor_units", 2)],
        r"minor_units must be 0 for JPY",
    ),
    (
        "notional not integer",
        [with_(TRADE, "max_notional.amount", 10.5)],
        r"max_notional/amount: 10.5 is not of type 'integer'",
    ),
    (
        "no instrument restriction",
        [with_(with_(TRADE, "isins", ...), "instrument_classes", ...)],
        r"\(object\)",
    ),
    ("unknown member", [with_(TRADE, "leverage", 10)], r"Additional properties are not allowed"),
    (
        "unknown action",
        [with_(TRADE, "actions", ["transfer"])],
        r"actions/0: 'transfer' is not one of",
    ),
    ("bad side", [with_(TRADE, "sides", ["short"])], r"sides/0"),
    ("bad BIC", [with_(SETTLEMENT, "places_of_settlement", ["DAKV"])], r"is not a 'bic'"),
    (
        "bad counterparty LEI",
        [with_(SETTLEMENT, "counterparties", ["5493001KJTIIGC8Y1R13"])],
        r"is not a 'lei'",
    ),
]


@pytest.mark.parametrize(
    ("raw", "message"), [(r, m) for _, r, m in NEGATIVES], ids=[n for n, _, _ in NEGATIVES]
)
def test_refusals_are_invalid_authorization_details(
    registry: AuthorizationDetailsRegistry, raw: Any, message: str
) -> None:
    with pytest.raises(InvalidAuthorizationDetailsError, match=message) as caught:
        registry.validate(raw, BOTH)
    assert caught.value.error == "invalid_authorization_details"
    assert caught.value.status_code == 400
    assert caught.value.body()["error"] == "invalid_authorization_details"


def test_type_the_client_did_not_register_is_refused(
    registry: AuthorizationDetailsRegistry,
) -> None:
    with pytest.raises(
        InvalidAuthorizationDetailsError, match=r"not registered for type 'settlement_instruction'"
    ):
        registry.validate([SETTLEMENT], client("trade_instruction"))
    with pytest.raises(
        InvalidAuthorizationDetailsError, match=r"not registered for type 'trade_instruction'"
    ):
        registry.validate([TRADE], client())


# --------------------------------------------------------------------------- covers


NARROWER = [
    ("same", TRADE),
    ("fewer actions", with_(TRADE, "actions", ["create_order"])),
    ("one ISIN", with_(TRADE, "isins", ["US0378331005"])),
    ("smaller notional", with_(TRADE, "max_notional.amount", 1_000)),
    ("one venue, one side", with_(with_(TRADE, "venues", ["XLON"]), "sides", ["buy"])),
    (
        "restriction the grant does not make",
        with_(TRADE, "locations", ["https://execution.example/api"]),
    ),
]
BROADER = [
    ("another account", with_(TRADE, "accounts", ["ACC-1", "ACC-2"])),
    ("another action", with_(TRADE, "actions", ["create_order", "amend_order"])),
    ("larger notional", with_(TRADE, "max_notional.amount", 500_000_001)),
    (
        "other currency",
        with_(TRADE, "max_notional", {"amount": 1, "currency": "USD", "minor_units": 2}),
    ),
    ("unknown ISIN", with_(TRADE, "isins", ["US5949181045"])),
    ("drops the venue restriction", with_(TRADE, "venues", ...)),
    ("drops the ISIN restriction", with_(TRADE, "isins", ...)),
    ("another type", SETTLEMENT),
]


@pytest.mark.parametrize("requested", [r for _, r in NARROWER], ids=[n for n, _ in NARROWER])
def test_covers_narrower(registry: AuthorizationDetailsRegistry, requested: dict[str, Any]) -> None:
    assert registry.covers([TRADE], [requested]) is True


@pytest.mark.parametrize("requested", [r for _, r in BROADER], ids=[n for n, _ in BROADER])
def test_does_not_cover_broader(
    registry: AuthorizationDetailsRegistry, requested: dict[str, Any]
) -> None:
    assert registry.covers([TRADE], [requested]) is False


def test_every_requested_detail_must_be_covered(registry: AuthorizationDetailsRegistry) -> None:
    assert registry.covers([TRADE, SETTLEMENT], [TRADE, SETTLEMENT]) is True
    assert registry.covers([TRADE], [TRADE, SETTLEMENT]) is False
    assert registry.covers([TRADE], []) is True


# --------------------------------------------------------------------------- describe, digest


def test_describe_in_business_language(registry: AuthorizationDetailsRegistry) -> None:
    rows = dict(registry.describe(TRADE))
    assert rows["Type"] == "Trade instruction"
    assert rows["Accounts"] == "ACC-1"
    assert rows["Venues (MIC)"] == "XLON, XETR"
    assert rows["Maximum notional per order"] == "EUR 5,000,000.00"
    assert (
        dict(registry.describe(SETTLEMENT))["Maximum cash amount per instruction"] == "JPY 100,000"
    )


def test_digest_ignores_key_order(registry: AuthorizationDetailsRegistry) -> None:
    reordered = dict(reversed(list(TRADE.items())))
    assert registry.digest([TRADE]) == registry.digest([reordered])
    assert registry.digest([TRADE]) != registry.digest([with_(TRADE, "accounts", ["ACC-2"])])
    assert registry.digest([]) is None


# --------------------------------------------------------------------------- configuration

COLLATERAL = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Collateral substitution",
    "type": "object",
    "required": ["type", "accounts"],
    "additionalProperties": False,
    "properties": {
        "type": {"const": "collateral_substitution"},
        "accounts": {"title": "Accounts", "type": "array", "items": {"type": "string"}},
        "isins": {"type": "array", "items": {"type": "string", "format": "isin"}},
    },
}


def test_a_type_is_added_by_configuration(tmp_path: Path) -> None:
    (tmp_path / "collateral_substitution.json").write_text(json.dumps(COLLATERAL))
    registry = AuthorizationDetailsRegistry.load(tmp_path)
    assert "collateral_substitution" in registry.names
    detail = {"type": "collateral_substitution", "accounts": ["A"], "isins": ["US0378331005"]}
    assert registry.validate([detail], client("collateral_substitution")) == (detail,)
    with pytest.raises(InvalidAuthorizationDetailsError, match="is not a 'isin'"):
        registry.validate([{**detail, "isins": ["XX"]}], client("collateral_substitution"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken", "{", "not a valid JSON Schema"),
        ("bad_schema", json.dumps({"type": "no-such-type"}), "not a valid JSON Schema"),
        ("wrong_const", json.dumps({**COLLATERAL}), "must require 'type'"),
        ("Bad-Name", json.dumps(COLLATERAL), "type name"),
    ],
)
def test_invalid_type_files_are_refused_at_load(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    (tmp_path / f"{name}.json").write_text(content)
    with pytest.raises(RegistryConfigError, match=message):
        AuthorizationDetailsRegistry.load(tmp_path)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryConfigError, match="is not a directory"):
        AuthorizationDetailsRegistry.load(tmp_path / "nope")


@pytest.mark.parametrize(
    "requested",
    [r for _, r in BROADER if r["type"] == "trade_instruction"],
    ids=[n for n, r in BROADER if r["type"] == "trade_instruction"],
)
def test_over_broad_against_a_grant_is_invalid_authorization_details(
    registry: AuthorizationDetailsRegistry, requested: dict[str, Any]
) -> None:
    with pytest.raises(
        InvalidAuthorizationDetailsError,
        match=r"\[0\] \(trade_instruction\) exceeds what was granted",
    ) as caught:
        registry.narrow([requested], BOTH, [TRADE])
    assert caught.value.error == "invalid_authorization_details"


def test_narrow_within_the_grant(registry: AuthorizationDetailsRegistry) -> None:
    narrower = with_(TRADE, "isins", ["US0378331005"])
    assert registry.narrow(json.dumps([narrower]), BOTH, [TRADE]) == (narrower,)
    assert registry.narrow(None, BOTH, [TRADE]) == (TRADE,)
    with pytest.raises(InvalidAuthorizationDetailsError, match="exceeds what was granted"):
        registry.narrow([SETTLEMENT], BOTH, [TRADE])
    with pytest.raises(InvalidAuthorizationDetailsError, match="is not a 'isin'"):
        registry.narrow([with_(TRADE, "isins", ["XX"])], BOTH, [TRADE])
