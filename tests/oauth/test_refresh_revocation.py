"""Refresh tokens at ``/revoke`` (RFC 7009 §2.1: a server that issues refresh tokens MUST support
their revocation) and ``/introspect`` (RFC 7662: we report only our access tokens; a refresh token
is exactly ``{"active": false}`` to everyone, its owner included), on SQLite and PostgreSQL."""

from __future__ import annotations

import httpx
import pytest
import pytest_asyncio

from tests.authorize.conftest import USER_LEI, Setup, register_code_client
from tests.authorize.flow import PASSWORD
from tests.protocol_server import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(server: Server) -> Setup:
    kit = await register_code_client(server)
    user = await server.services.authorization.users.add("alice", "Alice", USER_LEI, PASSWORD)
    return Setup(server, kit, user)


async def code_flow_tokens(setup: Setup) -> dict[str, str]:
    flow = setup.flow()
    response = await setup.token(flow.redeem_form(await flow.code("alice")))
    assert response.status_code == 200, response.text
    return dict(response.json())


async def refresh(setup: Setup, token: str) -> httpx.Response:
    return await setup.token({"grant_type": "refresh_token", "refresh_token": token})


async def revoke(setup: Setup, token: str, **form: str) -> httpx.Response:
    kit = setup.kit
    return await setup.server.http.post("/revoke", data={"token": token, **kit.auth(), **form})


async def introspect(setup: Setup, token: str) -> dict[str, object]:
    response = await setup.server.http.post(
        "/introspect", data={"token": token, **setup.kit.auth()}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.parametrize("hint", [None, "access_token", "refresh_token", "no-such-type"])
async def test_refresh_token_is_revoked_whatever_the_hint(setup: Setup, hint: str | None) -> None:
    """RFC 7009 §2.1: if the token is not found with the hint, the search MUST extend to every
    token type the server supports; the grant's access token goes too (SHOULD)."""
    tokens = await code_flow_tokens(setup)
    form = {"token_type_hint": hint} if hint else {}
    response = await revoke(setup, tokens["refresh_token"], **form)
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["cache-control"] == "no-store"
    refused = await refresh(setup, tokens["refresh_token"])
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
    assert await introspect(setup, tokens["access_token"]) == {"active": False}


async def test_another_clients_refresh_token_is_refused_and_keeps_working(setup: Setup) -> None:
    """RFC 7009 §2.1: the server verifies the token was issued to the client making the request;
    a refused request revokes nothing."""
    tokens = await code_flow_tokens(setup)
    other = await register_code_client(setup.server)
    response = await setup.server.http.post(
        "/revoke", data={"token": tokens["refresh_token"], **other.auth()}
    )
    assert (response.status_code, response.json()["error"]) == (400, "unauthorized_client")
    assert (await introspect(setup, tokens["access_token"]))["active"] is True
    assert (await refresh(setup, tokens["refresh_token"])).status_code == 200


async def test_revoking_a_rotated_refresh_token_ends_the_family(setup: Setup) -> None:
    """The predecessor is no longer usable, but it is the client's: revoking it ends the grant,
    the successor and its access token included."""
    first = await code_flow_tokens(setup)
    second = (await refresh(setup, first["refresh_token"])).json()
    assert (await revoke(setup, first["refresh_token"])).status_code == 200
    refused = await refresh(setup, second["refresh_token"])
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
    assert await introspect(setup, second["access_token"]) == {"active": False}


async def test_revoking_the_access_token_leaves_the_refresh_token(setup: Setup) -> None:
    """RFC 7009 §2.1: revoking an access token MAY revoke the refresh token too; we do not (the
    client revokes the refresh token to end the grant)."""
    tokens = await code_flow_tokens(setup)
    assert (await revoke(setup, tokens["access_token"])).status_code == 200
    assert await introspect(setup, tokens["access_token"]) == {"active": False}
    assert (await refresh(setup, tokens["refresh_token"])).status_code == 200


async def test_refresh_tokens_introspect_as_inactive_to_everyone(setup: Setup) -> None:
    """Only access tokens are reported (RFC 7662 §2.2 allows it); nothing about a refresh token
    leaks, to its owner or to a resource server."""
    tokens = await code_flow_tokens(setup)
    assert await introspect(setup, tokens["refresh_token"]) == {"active": False}
    response = await setup.server.http.post(
        "/introspect", data={"token": tokens["refresh_token"], **setup.server.kit.auth()}
    )
    assert (response.status_code, response.json()) == (200, {"active": False})
    assert (await refresh(setup, tokens["refresh_token"])).status_code == 200
