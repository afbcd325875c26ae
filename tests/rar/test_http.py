"""RFC 9396 at the token endpoint, over HTTP on both stores: bad ``authorization_details`` are a
400 ``invalid_authorization_details`` whose ``error_description`` stays within RFC 6749 §5.2's
character set, whatever the request carried; nothing of a refused request is written."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
import pytest_asyncio

from tests.conftest import ClientKit, register_kit
from tests.protocol_server import Server
from trustplane.audit.sink import recent_events
from trustplane.rar.registry import MAX_DETAILS, MAX_TEXT

pytestmark = pytest.mark.asyncio(loop_scope="module")

TRADE: dict[str, Any] = {
    "type": "trade_instruction",
    "actions": ["create_order"],
    "accounts": ["ACC-1"],
    "instrument_classes": ["bond"],
    "max_notional": {"amount": 100_000, "currency": "EUR", "minor_units": 2},
}
#: RFC 6749 §5.2: error_description uses %x20-21 / %x23-5B / %x5D-7E only.
DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trader(server: Server) -> ClientKit:
    return await register_kit(server.services, authorization_details_types=["trade_instruction"])


def error_of(response: Any) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


def details(*items: dict[str, Any]) -> str:
    return orjson.dumps(list(items)).decode()


HOSTILE_TEXT = [
    pytest.param([{"type": 'wire"transfer\\é'}], id="unknown-type"),
    pytest.param([{**TRADE, "accounts": ['ACC"1\\\u00e9\u2028']}], id="schema-value"),
    pytest.param([{**TRADE, 'bad"key\u00e9': 1}], id="unknown-member"),
]


@pytest.mark.parametrize("items", HOSTILE_TEXT)
async def test_error_description_keeps_to_the_rfc6749_character_set(
    server: Server, trader: ClientKit, items: list[dict[str, Any]]
) -> None:
    """The refusal names the problem, but a quote, a backslash or a non-ASCII character the client
    sent never reaches the wire description (RFC 6749 §5.2)."""
    response = await server.token(trader, authorization_details=orjson.dumps(items).decode())

    assert error_of(response) == (400, "invalid_authorization_details"), response.text
    description = response.json()["error_description"]
    assert DESCRIPTION.fullmatch(description), description
    assert description.startswith("authorization_details[0]")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(details({**TRADE, "locations": ["https://rs.example/\u0000x"]}), id="nul"),
        pytest.param(details({**TRADE, "accounts": ["ACC-1"], "x\u0000": 1}), id="nul-in-key"),
        pytest.param('[{"type": "trade_instruction\\ud800"}]', id="lone-surrogate"),
        pytest.param(details(*[TRADE] * (MAX_DETAILS + 1)), id="too-many"),
        pytest.param(details({**TRADE, "accounts": ["A" * 30] * (MAX_TEXT // 30)}), id="too-long"),
        pytest.param("[" * 2000 + "]" * 2000, id="deep-nesting"),
        pytest.param('[{"type": 7}]', id="type-not-a-string"),
        pytest.param('[{"actions": ["create_order"]}]', id="type-missing"),
        pytest.param('["trade_instruction"]', id="not-an-object"),
        pytest.param(
            details({**TRADE, "max_notional": {**TRADE["max_notional"], "amount": 1.5}}),
            id="wrong-member-type",
        ),
    ],
)
async def test_bad_details_are_refused_and_nothing_is_issued(
    server: Server, trader: ClientKit, text: str
) -> None:
    """RFC 9396 §5: malformed details are invalid_authorization_details on both stores (a NUL the
    JSON escapes would smuggle past the form's own NUL check included), never a 500, no token."""
    before = len(await recent_events(server.services.db, 500, "oauth:token:issued"))
    response = await server.token(trader, authorization_details=text)

    assert error_of(response) == (400, "invalid_authorization_details"), response.text
    assert DESCRIPTION.fullmatch(response.json()["error_description"])
    assert len(await recent_events(server.services.db, 500, "oauth:token:issued")) == before


async def test_repeated_authorization_details_is_invalid_request(
    server: Server, trader: ClientKit
) -> None:
    """RFC 6749 §3.2: a request parameter MUST NOT be included more than once."""
    form = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        **trader.auth(),
    }
    pairs = [*form.items(), *[("authorization_details", details(TRADE))] * 2]
    response = await server.http.post(
        "/token",
        content=urlencode(pairs),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert error_of(response) == (400, "invalid_request"), response.text


async def test_granted_details_are_echoed_in_the_token_response(
    server: Server, trader: ClientKit
) -> None:
    """RFC 9396 §7 (client_credentials: the client's registration decides, §6)."""
    response = await server.token(trader, authorization_details=details(TRADE))
    assert response.status_code == 200, response.text
    assert response.json()["authorization_details"] == [TRADE]
