"""Signing-key rotation seen from outside: the CLI rotates and prunes, the running server follows.

A relying party that verifies tokens with the published JWKS must see: the key that signs after a
rotation was already published before it; tokens signed by the retired key keep verifying until the
key's ``remove_after``; after that the key leaves the JWKS and its tokens stop verifying.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select, update

from tests.conftest import EXECUTION, run_sync
from tests.e2e.conftest import (
    PROPAGATION_TIMEOUT,
    LiveServer,
    LiveServers,
    client_credentials_token,
    introspect,
    register_client,
    wait_until,
)
from trustplane.keys.tables import signing_keys
from trustplane.storage.db import Database

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, live_server: LiveServers) -> LiveServer:
    database_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return live_server.start(database_url)


def published_kids(server: LiveServer) -> list[str]:
    response = httpx.get(f"{server.base_url}/jwks", timeout=10)
    assert response.status_code == 200
    return [key["kid"] for key in response.json()["keys"]]


def verify(server: LiveServer, token: str) -> dict[str, Any]:
    """PyJWT with a fresh JWKS fetch (no cache), as a relying party that just refreshed would."""
    jwks = jwt.PyJWKClient(f"{server.base_url}/jwks", cache_jwk_set=False, timeout=10)
    claims: dict[str, Any] = jwt.decode(
        token,
        jwks.get_signing_key_from_jwt(token).key,
        algorithms=["ES256"],
        audience=EXECUTION,
        issuer=server.issuer,
    )
    return claims


async def make_due(database_url: str, kid: str) -> None:
    """Pretend the retired key's tokens have all expired (instead of waiting out remove_after)."""
    db = Database(database_url)
    try:
        async with db.transaction() as conn:
            result = await conn.execute(
                update(signing_keys)
                .where(signing_keys.c.kid == kid, signing_keys.c.state == "retired")
                .values(remove_after=int(time.time()) - 1)
            )
            assert result.rowcount == 1
    finally:
        await db.dispose()


async def key_row(database_url: str, kid: str) -> Any:
    db = Database(database_url)
    try:
        async with db.read() as conn:
            query = select(signing_keys).where(signing_keys.c.kid == kid)
            return (await conn.execute(query)).mappings().one()
    finally:
        await db.dispose()


def test_rotation_and_removal_reach_the_running_server(server: LiveServer) -> None:
    kit = register_client(server)
    before = published_kids(server)
    assert len(before) == 2  # active + next, published ahead of use
    token_a = client_credentials_token(server, kit)
    kid_a = jwt.get_unverified_header(token_a)["kid"]
    (kid_next,) = set(before) - {kid_a}

    server.cli("keys", "rotate")

    after = wait_until(
        lambda: len(kids := published_kids(server)) == 3 and kids,
        PROPAGATION_TIMEOUT,
        "the rotated key set in the running server's JWKS",
    )
    assert set(before) < set(after)
    token_b = client_credentials_token(server, kit)
    assert jwt.get_unverified_header(token_b)["kid"] == kid_next
    assert verify(server, token_a)["jti"] != verify(server, token_b)["jti"]
    assert introspect(server, kit, token_a)["active"] is True

    database_url = server.env["TRUSTPLANE_DATABASE_URL"]
    run_sync(make_due(database_url, kid_a))
    assert server.cli_json("keys", "prune") == {"removed": [kid_a]}

    wait_until(
        lambda: kid_a not in published_kids(server),
        PROPAGATION_TIMEOUT,
        "the removed key to leave the running server's JWKS",
    )
    with pytest.raises(jwt.PyJWKClientError):
        verify(server, token_a)
    assert introspect(server, kit, token_a) == {"active": False}
    assert verify(server, token_b)["client_id"] == kit.client_id
    removed = run_sync(key_row(database_url, kid_a))
    assert removed["state"] == "removed"
    assert removed["private_key"] is None
