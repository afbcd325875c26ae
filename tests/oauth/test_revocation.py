"""Token revocation over HTTP (RFC 7009): a client revokes only its own tokens; unknown or invalid
tokens are a 200 no-op (§2.2); each revocation is audited once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import jwt
import pytest

from tests.conftest import EXECUTION, ClientKit, new_ec_key, register_kit
from tests.protocol_server import Server
from trustplane.audit.sink import recent_events

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def revoke(
    server: Server, token: str, kit: ClientKit | None = None, **form: str
) -> httpx.Response:
    return await server.http.post(
        "/revoke", data={"token": token, **(kit or server.kit).auth(), **form}
    )


async def is_active(server: Server, token: str, kit: ClientKit | None = None) -> bool:
    response = await server.http.post(
        "/introspect", data={"token": token, **(kit or server.kit).auth()}
    )
    body = response.json()
    assert body == {"active": False} or body["active"] is True, body
    return bool(body["active"])


async def revoked_events(server: Server, token: str) -> list[dict[str, object]]:
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    events = await recent_events(server.services.db, limit=10_000, type_="oauth:token:revoked")
    return [e for e in events if e["jti"] == jti]


@pytest.mark.parametrize(
    "hint", [pytest.param(None, id="no-hint"), pytest.param("refresh_token", id="wrong-hint")]
)
async def test_own_token_is_revoked(server: Server, hint: str | None) -> None:
    token = await server.access_token()
    assert await is_active(server, token)
    response = await revoke(server, token, **({"token_type_hint": hint} if hint else {}))
    assert response.status_code == 200, response.text
    assert response.content == b""
    assert not await is_active(server, token)
    [event] = await revoked_events(server, token)
    assert (event["client_id"], event["audience"]) == (server.kit.client_id, EXECUTION)


async def test_revoking_twice_is_200_and_audited_once(server: Server) -> None:
    token = await server.access_token()
    for _ in range(2):
        assert (await revoke(server, token)).status_code == 200
    assert len(await revoked_events(server, token)) == 1
    assert not await is_active(server, token)


async def test_another_clients_token_is_refused_and_stays_active(server: Server) -> None:
    owner = await register_kit(server.services)
    token = await server.access_token(owner)
    response = await revoke(server, token)  # server.kit is not the owner
    assert (response.status_code, response.json()["error"]) == (400, "unauthorized_client")
    assert await is_active(server, token, owner)
    assert await revoked_events(server, token) == []


TokenFactory = Callable[[Server], Awaitable[str]]


async def _garbage(s: Server) -> str:
    return "garbage"


async def _foreign_signed(s: Server) -> str:
    genuine = await s.access_token()
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False}) | {"jti": "forged"}
    return jwt.encode(
        claims, new_ec_key(), "ES256", headers={"kid": header["kid"], "typ": "at+jwt"}
    )


async def _expired(s: Server) -> str:
    return s.expired_token()


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(_garbage, id="garbage"),
        pytest.param(_foreign_signed, id="foreign-signed-with-our-kid"),
        pytest.param(_expired, id="expired"),
    ],
)
async def test_unknown_or_invalid_token_is_200(server: Server, make_token: TokenFactory) -> None:
    response = await revoke(server, await make_token(server))
    assert response.status_code == 200, response.text


REFUSED = [
    pytest.param(lambda s, t: {"token": t}, 401, "invalid_client", id="no-client-authentication"),
    pytest.param(
        lambda s, t: {"token": t, **s.kit.auth(aud=s.issuer + "/revoke")},
        401,
        "invalid_client",
        id="assertion-aud-is-endpoint",
    ),
    pytest.param(lambda s, t: s.kit.auth(), 400, "invalid_request", id="token-parameter-missing"),
]


@pytest.mark.parametrize(("form", "status", "error"), REFUSED)
async def test_refused_revocation_request(
    server: Server, form: Callable[[Server, str], dict[str, str]], status: int, error: str
) -> None:
    token = await server.access_token()
    response = await server.http.post("/revoke", data=form(server, token))
    assert (response.status_code, response.json()["error"]) == (status, error), response.text
    assert await is_active(server, token)
