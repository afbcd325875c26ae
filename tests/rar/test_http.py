"""RFC 9396 at the token endpoint, over HTTP on both stores: bad ``authorization_details`` are a
400 ``invalid_authorization_details`` whose ``error_description`` stays within RFC 6749 §5.2's
character set, whatever the request carried; nothing of a refused request is written."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import jwt
import orjson
import pytest
import pytest_asyncio

from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key, register_kit
from tests.protocol_server import Server
from trustplane.audit.sink import recent_events
from trustplane.oauth.exchange import TOKEN_EXCHANGE
from trustplane.protocol.tokens import issue_access_token
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
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
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


# --------------------------------------------------------------------------- /authorize and /par

REDIRECT_URI = "https://client.example/cb"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def arranger(server: Server) -> ClientKit:
    """A code-flow client registered for trade_instruction."""
    return await register_kit(
        server.services,
        grant_types=["authorization_code", "refresh_token"],
        redirect_uris=[REDIRECT_URI],
        scope="order:create order:cancel",
        allowed_resources=[EXECUTION],
        authorization_details_types=["trade_instruction"],
    )


def authorization_request(kit: ClientKit, text: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": kit.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "order:create",
        "resource": EXECUTION,
        "state": "st-1",
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256",
        "authorization_details": text,
    }


REFUSED_AT_AUTHORIZATION = [
    pytest.param(details({**TRADE, "locations": ["https://rs.example/\u0000x"]}), id="nul"),
    pytest.param(details({"type": 'wire"transfer\\\u00e9'}), id="hostile-type"),
    pytest.param(details({**TRADE, "accounts": ['ACC"1\\\u00e9']}), id="hostile-value"),
]


@pytest.mark.parametrize("text", REFUSED_AT_AUTHORIZATION)
async def test_par_refuses_bad_details_with_a_wire_safe_description(
    server: Server, arranger: ClientKit, text: str
) -> None:
    """RFC 9396 §5 at the pushed authorization request (RFC 9126 §2.3: a 400 error response)."""
    response = await server.http.post(
        "/par", data={**authorization_request(arranger, text), **arranger.auth()}
    )
    assert error_of(response) == (400, "invalid_authorization_details"), response.text
    assert DESCRIPTION.fullmatch(response.json()["error_description"])


@pytest.mark.parametrize("text", REFUSED_AT_AUTHORIZATION)
async def test_authorize_redirects_bad_details_with_a_wire_safe_description(
    server: Server, arranger: ClientKit, text: str
) -> None:
    """RFC 9396 §5 at /authorize: the error goes back to the client's redirect URI (RFC 6749
    §4.1.2.1), its description within RFC 6749's character set."""
    response = await server.http.get("/authorize", params=authorization_request(arranger, text))
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["location"])
    params = dict(parse_qsl(location.query))
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT_URI
    assert (params["error"], params["state"]) == ("invalid_authorization_details", "st-1")
    assert DESCRIPTION.fullmatch(params["error_description"]), params["error_description"]


# --------------------------------------------------------------------------- token exchange


async def test_token_exchange_response_echoes_the_details_of_the_issued_token(
    server: Server,
) -> None:
    """RFC 9396 §7: the token response returns the authorization_details assigned to the access
    token, on token exchange as on every grant: the subject token's details (absent from the
    request) and a narrowed subset (in the request). Before, only the token carried them."""
    kit = await register_kit(
        server.services,
        grant_types=["client_credentials", TOKEN_EXCHANGE],
        authorization_details_types=["trade_instruction"],
    )
    narrowed = {**TRADE, "accounts": ["ACC-1"], "sides": ["buy"]}

    async def exchange(**form: str) -> Any:
        subject = issue_access_token(
            server.services.keys.ring,
            issuer=server.issuer,
            subject="alice",
            client_id=kit.client_id,
            audience=EXECUTION,
            scopes=("order:create",),
            lifetime=300,
            extra={"lei": LEI, "authorization_details": [TRADE]},
        ).token
        data = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "resource": EXECUTION,
            "scope": "order:create",
            **kit.auth(),
            **form,
        }
        return await server.http.post("/token", data=data)

    for form, expected in (
        ({}, [TRADE]),
        ({"authorization_details": details(narrowed)}, [narrowed]),
    ):
        response = await exchange(**form)
        assert response.status_code == 200, response.text
        claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
        assert claims["authorization_details"] == expected
        assert response.json()["authorization_details"] == expected


# --------------------------------------------------------------------------- registration


async def test_registration_with_an_unknown_type_is_invalid_client_metadata(
    server: Server,
) -> None:
    """RFC 9396 §10: ``authorization_details_types`` names types this server knows (RFC 7591
    §3.2.2: else ``invalid_client_metadata``), and nothing is registered."""
    token = await server.services.clients.create_initial_access_token("tests", lei=LEI)
    before = len(await server.services.clients.list())
    body = {
        "client_name": "rar registration",
        "lei": LEI,
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
        "jwks": jwks_for(new_ec_key()),
        "authorization_details_types": ["trade_instruction", "wire_transfer"],
    }
    response = await server.http.post(
        "/register", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert error_of(response) == (400, "invalid_client_metadata"), response.text
    assert "wire_transfer" in response.json()["error_description"]
    assert len(await server.services.clients.list()) == before
