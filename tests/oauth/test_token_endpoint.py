"""The token endpoint over HTTP (RFC 6749 §3.2, §4.4, §5; RFC 8707; RFC 9068): one case per MUST.

Every refusal is asserted by status and exact ``error`` code; no input may produce a 500.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import orjson
import pytest
import pytest_asyncio

from tests.conftest import CLEARING, EXECUTION, LEI, ClientKit, register_kit
from tests.protocol_server import Server, store_client
from trustplane.audit.sink import SqlAuditSink
from trustplane.clients.authentication import AuthenticatedClient
from trustplane.clients.metadata import SUPPORTED_GRANT_TYPES
from trustplane.grant.contract import Granted
from trustplane.grant.outcomes import OutcomeRecorder
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.protocol.form import Form
from trustplane.storage.writer import GroupCommitWriter

pytestmark = pytest.mark.asyncio(loop_scope="module")

FORM = "application/x-www-form-urlencoded"
Pairs = list[tuple[str, str]]


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


# --------------------------------------------------------------------------- success


async def test_issued_token_response_and_jwt(server: Server) -> None:
    response = await server.token(scope="order:create order:cancel")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"  # RFC 6749 §5.1
    assert response.headers["pragma"] == "no-cache"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert (body["token_type"], body["expires_in"]) == ("Bearer", 300)
    assert body["scope"] == "order:create order:cancel"

    jwks = (await server.http.get("/jwks")).json()
    header = jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt"
    assert header["alg"] in ("ES256", "EdDSA", "PS256")
    assert header["kid"] in {key["kid"] for key in jwks["keys"]}
    claims = jwt.decode(
        body["access_token"],
        jwt.PyJWKSet.from_dict(jwks)[header["kid"]],
        algorithms=[header["alg"]],
        audience=EXECUTION,
        issuer=server.issuer,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )
    assert claims["aud"] == EXECUTION  # one audience, a string, not an array
    assert claims["sub"] == claims["client_id"] == server.kit.client_id
    assert claims["scope"] == "order:create order:cancel"
    assert claims["lei"] == LEI
    assert claims["exp"] - claims["iat"] == 300
    assert isinstance(claims["jti"], str)
    assert len(claims["jti"]) >= 16


async def test_each_token_has_its_own_jti(server: Server) -> None:
    tokens = [await server.access_token() for _ in range(2)]
    jtis = {jwt.decode(t, options={"verify_signature": False})["jti"] for t in tokens}
    assert len(jtis) == 2


async def test_form_content_type_with_charset_is_accepted(server: Server) -> None:
    pairs = [
        ("grant_type", "client_credentials"),
        ("scope", "order:create"),
        ("resource", EXECUTION),
    ]
    pairs += list(server.kit.auth().items())
    response = await server.http.post(
        "/token", content=urlencode(pairs), headers={"content-type": f"{FORM}; charset=UTF-8"}
    )
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- malformed requests


def base(kit: ClientKit, **drop_or_set: str | None) -> Pairs:
    values: dict[str, str | None] = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        "resource": EXECUTION,
        **kit.auth(),
    }
    values.update(drop_or_set)
    return [(k, v) for k, v in values.items() if v is not None]


def raw(body: str | bytes, content_type: str | None = FORM) -> dict[str, Any]:
    headers = {"content-type": content_type} if content_type else {}
    return {"content": body, "headers": headers}


RequestCase = Callable[[ClientKit], dict[str, Any]]

MALFORMED = [
    pytest.param(
        lambda k: raw(urlencode(base(k)), None), 400, "invalid_request", id="no-content-type"
    ),
    pytest.param(lambda k: {"json": dict(base(k))}, 400, "invalid_request", id="json-body"),
    pytest.param(
        lambda k: raw(urlencode(base(k)), "text/plain"), 400, "invalid_request", id="text-plain"
    ),
    pytest.param(
        lambda k: {"data": dict(base(k)), "files": {"f": b"x"}},
        400,
        "invalid_request",
        id="multipart-form-data",
    ),
    pytest.param(
        lambda k: raw(urlencode([*base(k), ("grant_type", "client_credentials")])),
        400,
        "invalid_request",
        id="repeated-grant_type",
    ),
    pytest.param(
        lambda k: raw(urlencode([*base(k), ("scope", "order:cancel")])),
        400,
        "invalid_request",
        id="repeated-scope",
    ),
    pytest.param(
        lambda k: raw(urlencode([*base(k), ("client_assertion", k.assertion())])),
        400,
        "invalid_request",
        id="repeated-client_assertion",
    ),
    pytest.param(
        lambda k: raw(urlencode(base(k, grant_type=None))),
        400,
        "invalid_request",
        id="missing-grant_type",
    ),
    pytest.param(
        lambda k: raw(urlencode(base(k, grant_type=""))),
        400,
        "invalid_request",
        id="empty-grant_type",
    ),
    pytest.param(
        lambda k: raw(urlencode(base(k, grant_type="urn:example:magic"))),
        400,
        "unsupported_grant_type",
        id="unknown-grant_type",
    ),
    pytest.param(
        lambda k: raw(urlencode(base(k, grant_type="password"))),
        400,
        "unsupported_grant_type",
        id="password-grant_type",
    ),
    pytest.param(
        lambda k: raw(urlencode(base(k, grant_type="authorization_code"))),
        400,
        "unauthorized_client",
        id="authorization_code-grant-not-registered",
    ),
    pytest.param(
        lambda k: raw(urlencode(base(k, grant_type="refresh_token"))),
        400,
        "unauthorized_client",
        id="refresh_token-grant-not-registered",
    ),
]


@pytest.mark.parametrize(("case", "status", "error"), MALFORMED)
async def test_malformed_token_request(
    server: Server, case: RequestCase, status: int, error: str
) -> None:
    response = await server.http.post("/token", **case(server.kit))
    assert error_of(response) == (status, error), response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_the_token_endpoint_is_post_only(server: Server, method: str) -> None:
    """RFC 6749 §3.2: the client MUST use POST; anything else is 405 and names POST."""
    response = await server.http.request(method, "/token", params=dict(base(server.kit)))
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "POST"


#: RFC 6749 §5.2: ``error_description`` is limited to %x20-21 / %x23-5B / %x5D-7E.
DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")

ECHOED = [
    pytest.param({"grant_type": "it's"}, "unsupported_grant_type", id="grant_type-with-apostrophe"),
    pytest.param({"grant_type": "gr\u00e4nt"}, "unsupported_grant_type", id="grant_type-non-ascii"),
    pytest.param({"grant_type": 'q"\\'}, "unsupported_grant_type", id="grant_type-quote-backslash"),
    pytest.param({"scope": 'order:create "x\\'}, "invalid_scope", id="scope-quote-backslash"),
    pytest.param({"scope": "ord\u00e9r:create"}, "invalid_scope", id="scope-non-ascii"),
]


@pytest.mark.parametrize(("form", "error"), ECHOED)
async def test_error_description_stays_in_the_allowed_characters(
    server: Server, form: dict[str, str], error: str
) -> None:
    """A description that quotes the request (an unknown grant_type, a scope) still holds only
    the characters RFC 6749 §5.2 allows; the ``error`` code is unchanged."""
    response = await server.token(**form)
    body = response.json()
    assert (response.status_code, body["error"]) == (400, error), response.text
    assert DESCRIPTION.fullmatch(body["error_description"]), body["error_description"]


HOSTILE = [
    pytest.param(
        lambda k: raw(urlencode([*base(k), ("pad", "x" * 70_000)])),
        413,  # RFC 9110 §15.5.14, refused by Content-Length before reading (trustplane.limits)
        "invalid_request",
        id="body-over-64-KiB",
    ),
    pytest.param(
        lambda k: raw(urlencode(base(k)).encode() + b"&note=\xff\xfe\xc3"),
        400,
        "invalid_request",
        id="invalid-utf8",
    ),
    pytest.param(
        lambda k: raw(urlencode([*base(k), *((f"f{i}", "1") for i in range(100))])),
        400,
        "invalid_request",
        id="100-fields",
    ),
    pytest.param(
        lambda k: raw(b"\x00\x01\x02&&&=%%%"), 400, "invalid_request", id="binary-garbage"
    ),
    pytest.param(lambda k: raw(b""), 400, "invalid_request", id="empty-body"),
    pytest.param(
        lambda k: raw(urlencode(base(k, scope="%ff"))), 400, "invalid_scope", id="scope-bad-percent"
    ),
    pytest.param(
        lambda k: raw(urlencode(base(k, scope=" ".join(f"s{i}:x" for i in range(1000))))),
        400,
        "invalid_scope",
        id="thousand-scopes",
    ),
    pytest.param(
        lambda k: raw(urlencode(base(k, client_assertion="é.é.é"))),
        401,
        "invalid_client",
        id="non-ascii-assertion",
    ),
    pytest.param(
        lambda k: raw(
            urlencode(
                [
                    *base(k, client_assertion=None, client_assertion_type=None),
                    ("client_id", "\x00"),
                    ("client_secret", "\x00"),
                ]
            )
        ),
        400,
        "invalid_request",  # a NUL is malformed in any parameter (protocol.form)
        id="NUL-client_id-and-secret",
    ),
    pytest.param(
        lambda k: {
            "content": urlencode(base(k, client_assertion=None, client_assertion_type=None)),
            "headers": {"content-type": FORM, "authorization": "Bearer abc"},
        },
        401,
        "invalid_client",
        id="bearer-instead-of-client-auth",
    ),
]


@pytest.mark.parametrize(("case", "status", "error"), HOSTILE)
async def test_hostile_input_never_500(
    server: Server, case: RequestCase, status: int, error: str
) -> None:
    response = await server.http.post("/token", **case(server.kit))
    assert error_of(response) == (status, error), response.text


# --------------------------------------------------------------------------- grant, scope, resource


async def test_client_not_registered_for_client_credentials(server: Server) -> None:
    """A client registered for the code flow only (stored directly: no redirect URIs needed here)."""
    kit = await register_kit(server.services)
    client = server.services.clients.registry.get(kit.client_id)
    assert client is not None
    metadata = {**client.metadata, "grant_types": ["authorization_code"]}
    await store_client(server.services, dataclasses.replace(client, metadata=metadata))
    assert error_of(await server.token(kit)) == (400, "unauthorized_client")


async def test_the_endpoint_serves_exactly_the_grants_the_metadata_lists(server: Server) -> None:
    """Built once with every grant (``oauth.wiring.build_token_endpoint``): what it serves is what
    RFC 8414 metadata and registration (``SUPPORTED_GRANT_TYPES``) say."""
    meta = (await server.http.get("/.well-known/oauth-authorization-server")).json()
    served = sorted(server.services.token_endpoint.grant_types)
    assert served == meta["grant_types_supported"] == sorted(SUPPORTED_GRANT_TYPES)


async def test_two_grants_for_one_grant_type_are_refused_at_construction(server: Server) -> None:
    class Twin:
        grant_type = "client_credentials"
        label = "client_credentials"

        async def handle(self, form: Form, auth: AuthenticatedClient) -> Granted:
            raise AssertionError("never called")

    writer = GroupCommitWriter(server.services.db)  # not started: nothing is written
    with pytest.raises(ValueError, match="two grants for grant_type 'client_credentials'"):
        TokenEndpoint(
            settings=server.services.settings,
            authenticator=server.services.authenticator,
            audit=SqlAuditSink(writer),
            outcomes=OutcomeRecorder(writer),
            grants=[Twin(), Twin()],
        )


SCOPES = [
    pytest.param(None, id="missing"),
    pytest.param("   ", id="blank"),
    pytest.param("order:teleport", id="unknown"),
    pytest.param("order:create order:teleport", id="one-of-two-unknown"),
    pytest.param("report:view", id="not-allowed-for-client"),
    pytest.param("settlement:submit", id="not-accepted-by-resource"),
    pytest.param("order:create settlement:submit", id="one-not-accepted-by-resource"),
    # RFC 6749 §3.3: scope tokens are delimited by %x20 only and hold no control, quote, backslash
    # or non-ASCII character (these two were split on the whitespace and granted)
    pytest.param("order:create\torder:cancel", id="tab-delimited"),
    pytest.param("order:create\u2003order:cancel", id="em-space-delimited"),
    pytest.param("order:create\norder:cancel", id="newline-delimited"),
]


@pytest.mark.parametrize("scope", SCOPES)
async def test_invalid_scope(server: Server, scope: str | None) -> None:
    response = await server.token(scope=scope)
    assert error_of(response) == (400, "invalid_scope"), response.text


RESOURCES = [
    pytest.param([EXECUTION, CLEARING], id="two-resources"),
    pytest.param([EXECUTION, EXECUTION], id="same-resource-twice"),
    pytest.param("https://unknown.example/api", id="unknown"),
    pytest.param("https://reporting.example/api", id="not-allowed-for-client"),
    pytest.param("/api", id="relative"),
    pytest.param("execution.example/api", id="no-scheme"),
    pytest.param(EXECUTION + "#orders", id="fragment"),
    pytest.param(EXECUTION + "/", id="not-byte-equal"),
    pytest.param(None, id="missing-with-several-allowed"),
]


@pytest.mark.parametrize("resource", RESOURCES)
async def test_invalid_target(server: Server, resource: str | list[str] | None) -> None:
    response = await server.token(resource=resource)
    assert error_of(response) == (400, "invalid_target"), response.text


async def test_single_allowed_resource_is_the_default(server: Server) -> None:
    kit = await register_kit(
        server.services,
        scope="settlement:submit",
        allowed_resources=[CLEARING],
        introspection_resources=[],
    )
    token = await server.access_token(kit, resource=None, scope="settlement:submit")
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == CLEARING


# --------------------------------------------------------------------------- RFC 9396 on client_credentials

TRADE = {
    "type": "trade_instruction",
    "actions": ["create_order"],
    "accounts": ["ACC-1"],
    "instrument_classes": ["bond"],
    "max_notional": {"amount": 100_000, "currency": "EUR", "minor_units": 2},
}
REFUSED_DETAILS = [
    pytest.param('[{"type": "wire_transfer", "amount": 5}]', id="unknown-type"),
    pytest.param('[{"type": "settlement_instruction", "actions": ["submit"]}]', id="unregistered"),
    pytest.param('[{"type": "trade_instruction", "actions": ["teleport"]}]', id="invalid-shape"),
    pytest.param("[{", id="not-json"),
    pytest.param("[]", id="empty-array"),
    pytest.param('{"type": "trade_instruction"}', id="not-an-array"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trader(server: Server) -> ClientKit:
    return await register_kit(server.services, authorization_details_types=["trade_instruction"])


@pytest.mark.parametrize("details", REFUSED_DETAILS)
async def test_client_credentials_refuses_details_it_cannot_honour(
    server: Server, trader: ClientKit, details: str
) -> None:
    """RFC 9396 §5: an unknown type (or malformed details, or a type the client's registration
    does not name, §6) is 400 invalid_authorization_details, never dropped with a 200."""
    response = await server.token(trader, authorization_details=details)
    assert error_of(response) == (400, "invalid_authorization_details"), response.text


async def test_client_credentials_grants_registered_details(
    server: Server, trader: ClientKit
) -> None:
    response = await server.token(trader, authorization_details=orjson.dumps([TRADE]).decode())
    assert response.status_code == 200, response.text
    assert response.json()["authorization_details"] == [TRADE]  # RFC 9396 §7
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["authorization_details"] == [TRADE]
    plain = await server.token(trader)
    assert "authorization_details" not in plain.json()
