"""Revocation (RFC 7009) racing the things it must end, on PostgreSQL, where two transactions really
run at once (SQLite serialises writers, so these interleavings cannot happen there and the cases are
not generated for it).

RFC 7009 §2.1: revoking a refresh token invalidates the grant's tokens; a refresh that rotated the
token at the same moment must not leave its successor alive. Revoking one token twice at once is one
revocation: one audit event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import jwt
import pytest
import pytest_asyncio
from sqlalchemy import text

from tests.authorize.conftest import Setup
from tests.authorize.test_fapi2 import code_flow, one_uri_client
from tests.authorize.test_fapi2 import token as dpop_token
from tests.oauth.test_refresh_revocation import code_flow_tokens
from tests.oauth.test_refresh_revocation import setup as refresh_setup
from tests.protocol_server import Server, running_server
from trustplane.audit.sink import recent_events
from trustplane.authorize.store import SqlRefreshStore
from trustplane.ids import new_jti
from trustplane.protocol.revocations import SqlRevocationStore

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(request, tmp_path_factory, database="postgresql") as started:
        yield started


setup = refresh_setup


async def lock_waiters(setup: Setup) -> int:
    """Backends of this test database waiting for a row lock."""
    async with setup.server.services.db.read() as conn:
        query = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int((await conn.execute(query)).scalar_one())


async def until_waiting(setup: Setup) -> None:
    for _ in range(500):
        if await lock_waiters(setup) >= 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the revocation never waited for the rotation's lock")


async def revoke(setup: Setup, token: str) -> int:
    response = await setup.server.http.post("/revoke", data={"token": token, **setup.kit.auth()})
    return response.status_code


async def test_revocation_racing_a_rotation_also_ends_the_successor(setup: Setup) -> None:
    """A refresh (another instance, or a thief holding the token) rotates the refresh token and has
    not committed yet when the owner's revocation of the same token arrives: the revocation waits
    for the rotation's lock, and the successor the rotation stored is revoked too (it used to stay
    alive: the revocation's UPDATE could not see a row inserted after its snapshot)."""
    first = await code_flow_tokens(setup)
    store, db = SqlRefreshStore(), setup.server.services.db
    async with db.read() as conn:
        stored = await store.get(conn, first["refresh_token"])
    assert stored is not None
    successor, successor_jti, now = "successor-" + new_jti(), new_jti(), int(time.time())

    async with db.transaction() as rotation:  # what RefreshTokenGrant.handle does, held open
        assert await store.rotate(rotation, first["refresh_token"], now)
        await store.create(
            rotation,
            successor,
            stored.family_id,
            stored.grant,
            now=now,
            expires_at=stored.expires_at,
            access_jti=successor_jti,
            access_exp=now + 300,
        )
        revocation = asyncio.create_task(revoke(setup, first["refresh_token"]))
        await until_waiting(setup)
    assert await revocation == 200

    async with db.read() as conn:
        after = await store.get(conn, successor)
        successor_revoked = await SqlRevocationStore().is_revoked(conn, successor_jti)
    assert after is not None
    assert after.revoked_at is not None
    assert successor_revoked
    refreshed = await setup.token({"grant_type": "refresh_token", "refresh_token": successor})
    assert (refreshed.status_code, refreshed.json()["error"]) == (400, "invalid_grant")


async def test_concurrent_revocations_of_one_access_token_are_one_revocation(
    setup: Setup,
) -> None:
    token = await setup.server.access_token()
    statuses = await asyncio.gather(*(revoke_access(setup.server, token) for _ in range(6)))
    assert statuses == [200] * 6
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    events = await recent_events(setup.server.services.db, 10_000, "oauth:token:revoked")
    assert len([e for e in events if e["jti"] == jti]) == 1


async def revoke_access(server: Server, token: str) -> int:
    response = await server.http.post("/revoke", data={"token": token, **server.kit.auth()})
    return response.status_code


async def test_concurrent_revocations_of_one_refresh_token_are_one_revocation(
    setup: Setup,
) -> None:
    first = await code_flow_tokens(setup)
    async with setup.server.services.db.read() as conn:
        stored = await SqlRefreshStore().get(conn, first["refresh_token"])
    assert stored is not None
    statuses = await asyncio.gather(*(revoke(setup, first["refresh_token"]) for _ in range(6)))
    assert statuses == [200] * 6
    events = await recent_events(setup.server.services.db, 10_000, "oauth:refresh_family:revoked")
    assert len([e for e in events if e["payload"]["family_id"] == stored.family_id]) == 1


async def test_refresh_without_rotation_racing_a_revocation_is_refused(setup: Setup) -> None:
    """A fapi2 client's refresh does not rotate: it records the new access token in the family
    instead. A revocation of the family is in progress (not committed) when the refresh arrives:
    the refresh waits for it and is ``invalid_grant``. It used to read the token without a lock,
    see it unrevoked, and issue an access token the committed revocation never listed (200)."""
    server = setup.server
    kit = await one_uri_client(server, profile="fapi2")
    flow, returned = await code_flow(server, kit)
    first = await dpop_token(server, kit, flow.redeem_form(returned["code"]))
    assert first.status_code == 200, first.text
    refresh = first.json()["refresh_token"]
    store, db = SqlRefreshStore(), server.services.db
    async with db.read() as conn:
        stored = await store.get(conn, refresh)
    assert stored is not None
    form = {"grant_type": "refresh_token", "refresh_token": refresh}

    async with db.transaction() as revocation:  # what DelegatedRevocations.revoke does, held open
        assert (await store.revoke_family(revocation, stored.family_id, int(time.time()))).revoked
        refreshing = asyncio.create_task(dpop_token(server, kit, form))
        for _ in range(500):
            if refreshing.done() or await lock_waiters(setup) >= 1:
                break
            await asyncio.sleep(0.01)
    response = await refreshing
    assert (response.status_code, response.json().get("error")) == (400, "invalid_grant")


async def test_rotation_racing_a_revocation_in_progress_is_refused(setup: Setup) -> None:
    """The other order: the revocation holds the family's rows when the refresh rotates. The
    rotation's conditional update waits, finds the token revoked, and the refresh is
    ``invalid_grant``; no successor is stored."""
    first = await code_flow_tokens(setup)
    store, db = SqlRefreshStore(), setup.server.services.db
    async with db.read() as conn:
        stored = await store.get(conn, first["refresh_token"])
    assert stored is not None
    form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}

    async with db.transaction() as revocation:
        assert (await store.revoke_family(revocation, stored.family_id, int(time.time()))).revoked
        refreshing = asyncio.create_task(setup.token(form))
        for _ in range(500):
            if refreshing.done() or await lock_waiters(setup) >= 1:
                break
            await asyncio.sleep(0.01)
    response = await refreshing
    assert (response.status_code, response.json().get("error")) == (400, "invalid_grant")
    async with db.read() as conn:
        family = await conn.execute(
            text("SELECT count(*) FROM refresh_tokens WHERE family_id = :f"),
            {"f": stored.family_id},
        )
        assert family.scalar_one() == 1
