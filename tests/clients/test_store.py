"""The ClientStore and initial-access-token contracts on SQLite and PostgreSQL, and ClientService's
cache bookkeeping (generation bump + registry reload on every write)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from tests.conftest import EXECUTION, LEI, jwks_for, new_ec_key, register_kit
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.clients.model import Client, ClientStatus, hash_secret
from trustplane.clients.service import GENERATION, ClientNotFoundError
from trustplane.clients.store import SqlClientStore, SqlInitialAccessTokenStore
from trustplane.clients.tables import initial_access_tokens
from trustplane.errors import InvalidClientMetadataError, InvalidTokenError
from trustplane.storage import generations
from trustplane.storage.db import Database

NOW = 1_900_000_000


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.dispose()


def client(client_id: str, **metadata: Any) -> Client:
    meta: dict[str, Any] = {
        "lei": LEI,
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": jwks_for(new_ec_key(), kid="k1"),
        "grant_types": ["client_credentials"],
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
    }
    meta.update(metadata)
    return Client.build(
        client_id,
        meta,
        ClientStatus.ACTIVE,
        secret_hash=None,
        registration_token_hash=hash_secret("rat"),
        created_at=NOW,
        updated_at=NOW,
    )


# --------------------------------------------------------------------------- ClientStore


async def test_get_unknown_is_none(db: Database) -> None:
    async with db.read() as conn:
        assert await SqlClientStore().get(conn, "nobody") is None


async def test_add_then_get_round_trips(db: Database) -> None:
    original = client("tp-a", client_name="desk")
    async with db.transaction() as conn:
        await SqlClientStore().add(conn, original)

    async with db.read() as conn:
        loaded = await SqlClientStore().get(conn, "tp-a")

    assert loaded == original
    assert loaded.metadata == original.metadata
    assert (loaded.created_at, loaded.updated_at) == (NOW, NOW)
    assert loaded.registration_token_hash == hash_secret("rat")
    assert [(kid, alg) for kid, alg, _ in loaded.keys] == [("k1", "ES256")]


async def test_list_is_ordered_by_client_id(db: Database) -> None:
    async with db.transaction() as conn:
        for cid in ("tp-b", "tp-c", "tp-a"):
            await SqlClientStore().add(conn, client(cid))

    async with db.read() as conn:
        listed = await SqlClientStore().list(conn)

    assert [c.client_id for c in listed] == ["tp-a", "tp-b", "tp-c"]


async def test_list_empty(db: Database) -> None:
    async with db.read() as conn:
        assert await SqlClientStore().list(conn) == []


async def test_duplicate_add_fails(db: Database) -> None:
    async with db.transaction() as conn:
        await SqlClientStore().add(conn, client("tp-a"))

    with pytest.raises(IntegrityError):
        async with db.transaction() as conn:
            await SqlClientStore().add(conn, client("tp-a", scope="order:cancel"))

    async with db.read() as conn:
        kept = await SqlClientStore().get(conn, "tp-a")
    assert kept is not None
    assert kept.metadata["scope"] == "order:create"


async def test_replace_existing(db: Database) -> None:
    original = client("tp-a")
    async with db.transaction() as conn:
        await SqlClientStore().add(conn, original)
    changed = replace(
        client("tp-a", scope="order:cancel"),
        status=ClientStatus.DISABLED,
        secret_hash=hash_secret("s"),
        created_at=NOW + 99,  # ignored: created_at is never rewritten
        updated_at=NOW + 5,
    )

    async with db.transaction() as conn:
        assert await SqlClientStore().replace(conn, changed) is True
    async with db.read() as conn:
        loaded = await SqlClientStore().get(conn, "tp-a")

    assert loaded is not None
    assert loaded.metadata["scope"] == "order:cancel"
    assert loaded.status is ClientStatus.DISABLED
    assert loaded.secret_hash == hash_secret("s")
    assert (loaded.created_at, loaded.updated_at) == (NOW, NOW + 5)


async def test_replace_unknown_returns_false(db: Database) -> None:
    async with db.transaction() as conn:
        assert await SqlClientStore().replace(conn, client("tp-ghost")) is False
    async with db.read() as conn:
        assert await SqlClientStore().list(conn) == []


async def test_delete(db: Database) -> None:
    async with db.transaction() as conn:
        await SqlClientStore().add(conn, client("tp-a"))
        await SqlClientStore().add(conn, client("tp-b"))

    async with db.transaction() as conn:
        assert await SqlClientStore().delete(conn, "tp-a") is True
    async with db.transaction() as conn:
        assert await SqlClientStore().delete(conn, "tp-a") is False
        assert await SqlClientStore().delete(conn, "tp-ghost") is False

    async with db.read() as conn:
        assert [c.client_id for c in await SqlClientStore().list(conn)] == ["tp-b"]


async def test_store_does_not_commit(db: Database) -> None:
    """The unit of work owns the transaction: a failure after add() leaves nothing behind."""

    async def add_then_fail() -> None:
        async with db.transaction() as conn:
            await SqlClientStore().add(conn, client("tp-a"))
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match=r"^abort$"):
        await add_then_fail()

    async with db.read() as conn:
        assert await SqlClientStore().get(conn, "tp-a") is None


# --------------------------------------------------------------------------- initial access tokens


async def _add_token(db: Database, token: str, expires_at: int, max_uses: int | None) -> None:
    async with db.transaction() as conn:
        await SqlInitialAccessTokenStore().add(
            conn, hash_secret(token), "test", NOW, expires_at, max_uses, lei=LEI
        )


async def _use(db: Database, token: str, now: int) -> bool:
    async with db.transaction() as conn:
        return await SqlInitialAccessTokenStore().use(conn, hash_secret(token), now)


async def _uses(db: Database, token: str) -> int:
    async with db.read() as conn:
        row = await conn.execute(
            select(initial_access_tokens.c.uses).where(
                initial_access_tokens.c.token_hash == hash_secret(token)
            )
        )
        return int(row.scalar_one())


async def test_unknown_token_is_refused(db: Database) -> None:
    assert await _use(db, "never-issued", NOW) is False


async def test_token_expires(db: Database) -> None:
    await _add_token(db, "t", expires_at=NOW + 60, max_uses=None)

    assert await _use(db, "t", NOW + 59) is True
    assert await _use(db, "t", NOW + 60) is False
    assert await _use(db, "t", NOW + 61) is False
    assert await _uses(db, "t") == 1


async def test_token_max_uses(db: Database) -> None:
    await _add_token(db, "t", expires_at=NOW + 60, max_uses=2)

    assert [await _use(db, "t", NOW) for _ in range(4)] == [True, True, False, False]
    assert await _uses(db, "t") == 2


async def test_token_without_max_uses_is_unlimited(db: Database) -> None:
    await _add_token(db, "t", expires_at=NOW + 60, max_uses=None)

    assert [await _use(db, "t", NOW) for _ in range(5)] == [True] * 5
    assert await _uses(db, "t") == 5


async def test_only_the_hash_of_the_token_is_stored(db: Database) -> None:
    await _add_token(db, "plain-token-value", expires_at=NOW + 60, max_uses=1)

    async with db.read() as conn:
        rows = (await conn.execute(select(initial_access_tokens))).mappings().all()

    assert [r["token_hash"] for r in rows] == [hash_secret("plain-token-value")]
    assert "plain-token-value" not in str([dict(r) for r in rows])


@pytest.mark.postgres
async def test_racing_uses_of_a_single_use_token(pg_url: str) -> None:
    first, second = Database(pg_url, pool_size=10), Database(pg_url, pool_size=10)
    try:
        for round_ in range(3):
            token = f"race-{round_}"
            await _add_token(first, token, expires_at=NOW + 60, max_uses=1)

            results = await asyncio.gather(
                *(_use(first if i % 2 else second, token, NOW) for i in range(20))
            )

            assert results.count(True) == 1, results
            assert await _uses(first, token) == 1
    finally:
        await first.dispose()
        await second.dispose()


# --------------------------------------------------------------------------- ClientService


async def _generation(services: Services) -> int:
    async with services.db.read() as conn:
        return (await generations.read_all(conn)).get(GENERATION, 0)


async def test_register_bumps_the_generation_and_reloads_the_registry(services: Services) -> None:
    before = await _generation(services)

    kit = await register_kit(services)

    assert await _generation(services) == before + 1
    registered = services.clients.registry.get(kit.client_id)
    assert registered is not None
    assert registered.active is True
    assert registered.lei == LEI
    assert len(services.clients.registry) == 1
    events = await recent_events(services.db, type_="oauth:client:registered")
    assert [e["client_id"] for e in events] == [kit.client_id]


async def test_update_bumps_and_reloads(services: Services) -> None:
    kit = await register_kit(services)
    current = services.clients.registry.get(kit.client_id)
    assert current is not None
    before = await _generation(services)
    body = {**current.metadata, "client_id": kit.client_id, "scope": "order:cancel"}
    body.pop("resource_server_for")  # the operator's grant: never sent by the client (see below)

    updated = await services.clients.update(current, body)

    assert await _generation(services) == before + 1
    assert updated.scopes == frozenset({"order:cancel"})
    reloaded = services.clients.registry.get(kit.client_id)
    assert reloaded is not None
    assert reloaded.scopes == frozenset({"order:cancel"})
    assert reloaded.created_at == current.created_at


async def test_update_cannot_change_the_auth_method(services: Services) -> None:
    kit = await register_kit(services)
    current = services.clients.registry.get(kit.client_id)
    assert current is not None
    body = {
        **current.metadata,
        "client_id": kit.client_id,
        "token_endpoint_auth_method": "client_secret_basic",
    }
    body.pop("jwks")
    body.pop("resource_server_for")
    before = await _generation(services)

    with pytest.raises(
        InvalidClientMetadataError,
        match=r"^token_endpoint_auth_method cannot be changed; register anew$",
    ):
        await services.clients.update(current, body)
    assert await _generation(services) == before


async def test_disabled_client_is_not_active(services: Services) -> None:
    kit = await register_kit(services)
    before = await _generation(services)

    disabled = await services.clients.set_status(kit.client_id, ClientStatus.DISABLED)

    assert disabled.active is False
    assert await _generation(services) == before + 1
    cached = services.clients.registry.get(kit.client_id)
    assert cached is not None
    assert (cached.status, cached.active) == (ClientStatus.DISABLED, False)
    assert (await services.clients.get(kit.client_id)).active is False
    assert [
        e["client_id"] for e in await recent_events(services.db, type_="oauth:client:disabled")
    ] == [kit.client_id]

    await services.clients.set_status(kit.client_id, ClientStatus.ACTIVE)

    assert await _generation(services) == before + 2
    cached = services.clients.registry.get(kit.client_id)
    assert cached is not None
    assert cached.active is True


async def test_delete_bumps_and_reloads(services: Services) -> None:
    kit = await register_kit(services)
    other = await register_kit(services)
    before = await _generation(services)

    await services.clients.delete(kit.client_id)

    assert await _generation(services) == before + 1
    assert services.clients.registry.get(kit.client_id) is None
    assert services.clients.registry.get(other.client_id) is not None
    with pytest.raises(ClientNotFoundError):
        await services.clients.delete(kit.client_id)
    with pytest.raises(ClientNotFoundError):
        await services.clients.get(kit.client_id)
    assert await _generation(services) == before + 1


async def test_set_status_of_unknown_client(services: Services) -> None:
    with pytest.raises(ClientNotFoundError):
        await services.clients.set_status("tp-ghost", ClientStatus.DISABLED)


async def test_registration_with_an_initial_access_token(services: Services) -> None:
    token = await services.clients.create_initial_access_token("ops", ttl=600, max_uses=1, lei=LEI)
    before = await _generation(services)

    reg = await services.clients.register(_raw(), initial_access_token=token)

    assert services.clients.registry.get(reg.client.client_id) is not None
    assert reg.registration_access_token is not None
    assert reg.client.registration_token_hash == hash_secret(reg.registration_access_token)
    with pytest.raises(InvalidTokenError, match=r"invalid, expired or used up"):
        await services.clients.register(_raw(), initial_access_token=token)
    with pytest.raises(InvalidTokenError, match=r"invalid, expired or used up"):
        await services.clients.register(_raw(), initial_access_token="forged")
    assert await _generation(services) == before + 1
    assert len(services.clients.registry) == 1


def _raw() -> dict[str, Any]:
    return {
        "lei": LEI,
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
        "jwks": jwks_for(new_ec_key()),
    }
