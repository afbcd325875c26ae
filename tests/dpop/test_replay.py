"""Proof jti replay (RFC 9449 §11.1) on the stores trustplane already runs: the SQL replay cache
(SQLite, PostgreSQL) and Redis, in a namespace apart from assertion jtis; and the SDK's bounded
in-memory store. On PostgreSQL, one proof raced by many verifications: exactly one wins."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import KEK, REDIS_URL, make_settings, require_service, truncate_all
from tests.dpop.conftest import URL, ProofKey
from trustplane.dpop import (
    REPLAY_NAMESPACE,
    DpopVerifier,
    InvalidDpopProofError,
    MemoryJtiStore,
    UseDpopNonceError,
    verifier_from_settings,
)
from trustplane.errors import TemporarilyUnavailableError
from trustplane.protocol.replay import RedisReplayCache, SqlReplayCache
from trustplane.settings import decode_kek
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade
from trustplane.storage.writer import GroupCommitWriter

SQL = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=SQL)
async def sql_cache(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SqlReplayCache]:
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'replay.db'}")
        await upgrade(db)
    else:
        url = request.getfixturevalue("pg_database")
        await truncate_all(url)
        db = Database(url)
    writer = GroupCommitWriter(db)
    cache = SqlReplayCache(writer, db)
    writer.start()
    yield cache
    await writer.stop()
    await db.dispose()


async def test_sql_cache_refuses_a_replayed_proof(sql_cache: SqlReplayCache) -> None:
    key = ProofKey.generate()
    verifier = DpopVerifier(sql_cache)
    value = key.proof()
    await verifier.verify_for_token_endpoint([value], "POST", URL)

    with pytest.raises(InvalidDpopProofError) as refused:
        await DpopVerifier(sql_cache).verify_for_token_endpoint([value], "POST", URL)

    assert refused.value.error == "invalid_dpop_proof"
    assert refused.value.debug == "dpop_replay"


async def test_a_proof_jti_never_collides_with_an_assertion_jti(sql_cache: SqlReplayCache) -> None:
    """Same jti string used by a client assertion (namespace: the client id) and a proof."""
    key = ProofKey.generate()
    jti = uuid.uuid4().hex
    assert await sql_cache.consume("client-1", jti, int(time.time()) + 60)
    assert await sql_cache.consume(REPLAY_NAMESPACE.removesuffix(":"), jti, int(time.time()) + 60)

    await DpopVerifier(sql_cache).verify_for_token_endpoint([key.proof(jti=jti)], "POST", URL)


async def test_the_jti_is_remembered_only_for_the_iat_window(sql_cache: SqlReplayCache) -> None:
    """Expiry = iat + max_age + max_ahead: past it the proof is refused on iat anyway, so the row
    can go (prune) and the table stays bounded by the window."""
    key = ProofKey.generate()
    iat = int(time.time()) - 200
    verifier = DpopVerifier(sql_cache, max_age=60, max_ahead=10)
    await verifier.verify_for_token_endpoint([key.proof(iat=iat)], "POST", URL, now=iat + 5)

    assert await sql_cache.prune() == 1


@pytest.mark.postgres
async def test_racing_reuse_on_postgresql_exactly_one_wins(pg_database: str) -> None:
    """One proof, presented by 20 concurrent verifications on 4 verifier instances sharing the
    database (like 4 servers): exactly one succeeds, every other one is a replay."""
    await truncate_all(pg_database)
    dbs = [Database(pg_database) for _ in range(4)]
    writers = [GroupCommitWriter(db) for db in dbs]
    verifiers = [DpopVerifier(SqlReplayCache(w, db)) for w, db in zip(writers, dbs, strict=True)]
    for writer in writers:
        writer.start()
    value = ProofKey.generate().proof()
    try:
        results = await asyncio.gather(
            *(verifiers[i % 4].verify_for_token_endpoint([value], "POST", URL) for i in range(20)),
            return_exceptions=True,
        )
    finally:
        for writer in writers:
            await writer.stop()
        for db in dbs:
            await db.dispose()

    won = [r for r in results if not isinstance(r, BaseException)]
    replays = [r for r in results if isinstance(r, InvalidDpopProofError)]
    assert len(won) == 1
    assert len(replays) == 19
    assert {r.debug for r in replays} == {"dpop_replay"}


@pytest.mark.redis
async def test_redis_cache_refuses_a_replayed_proof() -> None:
    require_service("Redis", "127.0.0.1", 6379)
    cache = RedisReplayCache(REDIS_URL)
    key = ProofKey.generate()
    value = key.proof()
    try:
        await DpopVerifier(cache).verify_for_token_endpoint([value], "POST", URL)
        with pytest.raises(InvalidDpopProofError):
            await DpopVerifier(cache).verify_for_token_endpoint([value], "POST", URL)
    finally:
        await cache.aclose()


class TestMemoryStore:
    async def test_single_use_until_expiry(self) -> None:
        now = [1000.0]
        store = MemoryJtiStore(clock=lambda: now[0])
        assert await store.consume("ns", "j", 1060)
        assert not await store.consume("ns", "j", 1060)
        now[0] = 1061
        assert await store.consume("ns", "j", 1121)
        assert len(store) == 1

    async def test_full_of_live_entries_fails_closed(self) -> None:
        """Forgetting a live jti would allow its replay: refuse (503) instead."""
        now = [1000.0]
        store = MemoryJtiStore(max_entries=2, clock=lambda: now[0])
        assert await store.consume("ns", "a", 1060)
        assert await store.consume("ns", "b", 1030)
        with pytest.raises(TemporarilyUnavailableError):
            await store.consume("ns", "c", 1060)
        assert not await store.consume("ns", "a", 1060)  # still remembered
        now[0] = 1031  # "b" expired, even though it is not the oldest entry
        assert await store.consume("ns", "c", 1060)


async def test_deployment_verifiers_share_nonces_through_the_kek(tmp_path: Path) -> None:
    """Two instances built from the same settings and KEK (nothing else shared) accept each other's
    nonces; another KEK's nonce is stale here."""
    settings = make_settings(
        "sqlite:///unused.db", tmp_path, dpop_nonce_required=True, dpop_nonce_lifetime=120
    )
    kek = decode_kek(KEK)
    one = verifier_from_settings(settings, kek, MemoryJtiStore())
    two = verifier_from_settings(settings, kek, MemoryJtiStore())
    foreign = verifier_from_settings(settings, b"\x01" * 32, MemoryJtiStore())
    key = ProofKey.generate()
    nonce = one.fresh_nonce()

    proof = await two.verify_for_token_endpoint([key.proof(nonce=nonce)], "POST", URL)
    assert proof.nonce == nonce
    with pytest.raises(UseDpopNonceError):
        await foreign.verify_for_token_endpoint([key.proof(nonce=nonce)], "POST", URL)
