"""Proofs served from the database (and from the nodes kept in memory) against an independent
recomputation: RFC 9162 §2.1.3.1 PATH and §2.1.4.1 PROOF written as the RFC states them, recursively
over the leaf hashes, at every index and every size the log passes through while it grows; and, on
PostgreSQL, concurrent proofs sharing statements, each verified against the signed checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import create_async_engine

from tests.audit.ledger_helpers import append, event, export
from tests.conftest import make_settings, pg_admin
from trustplane.app import Services
from trustplane.audit import merkle, proof_nodes
from trustplane.audit.ledger import Ledger
from trustplane.audit.note import Verifier, open_checkpoint
from trustplane.dependencies import database_failure
from trustplane.settings import Settings
from trustplane.storage.db import Database, async_url


def uncached(settings: Settings) -> Settings:
    """``settings`` with no lower level kept in memory: the proofs read those nodes from the
    database (the path these tests look at)."""
    return settings.model_copy(update={"audit_proof_cache_mb": 0})


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 MTH over leaf hashes."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << (len(leaves) - 1).bit_length() - 1
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(m, D[n])."""
    if len(leaves) == 1:
        return []
    k = 1 << (len(leaves) - 1).bit_length() - 1
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    """RFC 9162 §2.1.4.1 SUBPROOF(m, D[n], b)."""
    n = len(leaves)
    if m == n:
        return [] if whole else [mth(leaves)]
    k = 1 << (n - 1).bit_length() - 1
    if m <= k:
        return [*subproof(m, leaves[:k], whole), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def test_inclusion_node_ids_fold_to_the_rfc_path_at_every_index_and_size() -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(70)]
    tree = merkle.MemoryTree(leaves)
    for size in range(1, len(leaves) + 1):
        for index in range(size):
            plan = merkle.inclusion_nodes(index, size)
            hashes = [merkle.fold([tree.nodes[i] for i in ids]) for ids in plan]
            assert hashes == path(index, leaves[:size]), (index, size)


@pytest.mark.parametrize("seed", range(4))
def test_inclusion_node_ids_equal_the_ranges_decomposed_at_large_sizes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        size = rng.randrange(1, 1 << 47)
        index = rng.choice([0, size - 1, rng.randrange(size)])
        ranges = merkle.inclusion_ranges(index, size)
        expected = [[merkle.node_id(*n) for n in merkle.perfect_nodes(a, b)] for a, b in ranges]
        assert merkle.inclusion_nodes(index, size) == expected, (index, size)
    with pytest.raises(ValueError, match="not in a tree"):
        merkle.inclusion_nodes(5, 5)


@pytest.mark.parametrize("cached_from_level", [0, proof_nodes.MIN_LEVEL])
@pytest.mark.parametrize("cache_mb", [0, 1])
async def test_proofs_equal_the_rfc_recomputation_while_the_log_grows(
    services: Services, monkeypatch: pytest.MonkeyPatch, cached_from_level: int, cache_mb: int
) -> None:
    """Level 0: every node read is kept, so each size after the first is proved partly from nodes
    read at smaller sizes (a stale node would show here); ``cache_mb`` 1: the lower levels are
    kept too, filled in the background as proofs miss them (served from memory or the database,
    whichever has them first)."""
    monkeypatch.setattr(proof_nodes, "MIN_LEVEL", cached_from_level)
    settings = services.settings.model_copy(update={"audit_proof_cache_mb": cache_mb})
    ledger = Ledger(settings, services.db, services.ledger._kek)
    await services.ledger.integrate_all()
    sizes: list[int] = []
    for n, batch in enumerate([1, 1, 2, 3, 9, 16, 33]):
        await append(services.db, [event(n * 100 + i) for i in range(batch)])
        await services.ledger.integrate_all()
        records, _ = await export(ledger)
        leaves = [
            hashlib.sha256(b"\x00" + orjson.dumps(r["entry"], option=orjson.OPT_SORT_KEYS)).digest()
            for r in records
        ]
        size = len(leaves)
        sizes.append(size)
        for index in range(size):
            assert await ledger.inclusion(index, size) == path(index, leaves), (index, size)
        for old in sizes:
            for index in range(0, old, 3):
                assert await ledger.inclusion(index, old) == path(index, leaves[:old])
            assert await ledger.consistency(old, size) == subproof(old, leaves, True), (old, size)


async def leaf_hashes(ledger: Ledger) -> list[bytes]:
    records, _ = await export(ledger)
    return [
        hashlib.sha256(b"\x00" + orjson.dumps(r["entry"], option=orjson.OPT_SORT_KEYS)).digest()
        for r in records
    ]


@pytest.fixture
async def pg_log(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Services, list[bytes]]]:
    """A PostgreSQL log of 37 integrated entries, and their leaf hashes."""
    svc = Services.build(make_settings(pg_url, tmp_path))
    await svc.start()
    try:
        await append(svc.db, [event(i) for i in range(37)])
        await svc.ledger.integrate_all()
        yield svc, await leaf_hashes(svc.ledger)
    finally:
        await svc.stop()


async def signed_root(svc: Services, size: int) -> bytes:
    """The root in the signed checkpoint note of ``size``, its signature checked."""
    checkpoint = await svc.ledger.checkpoint(size)
    assert checkpoint is not None
    verifier = Verifier.parse(await svc.ledger.verifier_key())
    opened = open_checkpoint(checkpoint.note, verifier, svc.ledger.origin)
    assert opened.size == size
    return opened.root


@pytest.mark.postgres
async def test_concurrent_proofs_on_postgresql_share_statements(
    pg_log: tuple[Services, list[bytes]],
) -> None:
    """Every leaf's proof asked at once: at most FLIGHTS statements in flight, each on a held
    driver connection (no checkout from SQLAlchemy's pools), and each proof equal to the RFC's and
    verifying against the signed root."""
    svc, leaves = pg_log
    size = len(leaves)
    root = await signed_root(svc, size)
    ledger = Ledger(uncached(svc.settings), svc.db, svc.ledger._kek)  # nothing in memory
    await ledger.inclusion(0, size)  # it learns the tree size
    with counted_checkouts(svc) as checkouts:
        proofs = await asyncio.gather(*(ledger.inclusion(i, size) for i in range(size)))
    assert checkouts == []  # old code: one per statement, through SQLAlchemy's pool
    assert ledger._nodes._held is not None
    assert 1 <= ledger._nodes._held.open_count <= proof_nodes.FLIGHTS
    for index, proof in enumerate(proofs):
        assert proof == path(index, leaves), index
        assert merkle.verify_inclusion(index, size, leaves[index], proof, root), index


@pytest.mark.postgres
async def test_a_cancelled_proof_does_not_cancel_the_others_sharing_its_statement(
    pg_log: tuple[Services, list[bytes]],
) -> None:
    svc, leaves = pg_log
    size = len(leaves)
    ledger = Ledger(uncached(svc.settings), svc.db, svc.ledger._kek)
    await ledger.inclusion(0, size)
    tasks = [asyncio.create_task(ledger.inclusion(i, size)) for i in range(8)]
    await asyncio.sleep(0)  # every one waits for the shared statement
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [path(i, leaves) for i in range(1, 8)]
    assert await ledger.inclusion(0, size) == path(0, leaves)  # and the next ones are served


@pytest.mark.postgres
async def test_proofs_survive_their_pooled_connections_being_terminated(
    pg_log: tuple[Services, list[bytes]],
) -> None:
    svc, leaves = pg_log
    size = len(leaves)
    ledger = Ledger(uncached(svc.settings), svc.db, svc.ledger._kek)
    assert await ledger.inclusion(3, size) == path(3, leaves)  # a pooled connection now exists
    admin = create_async_engine(async_url(svc.settings.effective_database_url))
    async with admin.connect() as conn:
        await conn.exec_driver_sql(
            "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    await admin.dispose()
    proofs = await asyncio.gather(*(ledger.inclusion(i, size) for i in range(size)))
    assert proofs == [path(i, leaves) for i in range(size)]


@contextlib.contextmanager
def counted_checkouts(svc: Services) -> Iterator[list[Any]]:
    """Every checkout from the database's two pools (the engine's and the autocommit one's) while
    the block runs."""
    checkouts: list[Any] = []

    def checkout(*args: Any) -> None:
        checkouts.append(args)

    pools = [svc.db.engine.sync_engine.pool, svc.db.autocommit_engine.sync_engine.pool]
    for pool in pools:
        sa_event.listen(pool, "checkout", checkout)
    try:
        yield checkouts
    finally:
        for pool in pools:
            sa_event.remove(pool, "checkout", checkout)


def held_statements(ledger: Ledger) -> list[str]:
    """The statements every driver connection the ledger's proofs hold runs from now on."""
    assert ledger._nodes._held is not None
    statements: list[str] = []
    for conn in ledger._nodes._held._open:
        conn.add_query_logger(lambda record: statements.append(record.query))
    return statements


@pytest.mark.postgres
async def test_a_lone_proof_is_one_statement_on_a_held_connection_without_sqlalchemy(
    pg_log: tuple[Services, list[bytes]],
) -> None:
    """Old code: a checkout from the autocommit engine's pool for each statement (about 0.25 ms
    of this process's CPU, more than the statement)."""
    svc, leaves = pg_log
    size = len(leaves)
    root = await signed_root(svc, size)
    ledger = Ledger(uncached(svc.settings), svc.db, svc.ledger._kek)
    await ledger.inclusion(0, size)  # it learns the tree size, and opens a connection
    statements = held_statements(ledger)
    for index in (5, 22, 17):
        with counted_checkouts(svc) as checkouts:
            proof = await ledger.inclusion(index, size)
        assert checkouts == []
        assert proof == path(index, leaves)
        assert merkle.verify_inclusion(index, size, leaves[index], proof, root)
    await asyncio.sleep(0)  # asyncpg calls its query loggers soon after each statement
    assert statements == [proof_nodes._PG_NODES_SQL] * 3


@pytest.mark.postgres
async def test_a_proof_cancelled_mid_statement_drops_its_connection(
    pg_log: tuple[Services, list[bytes]],
) -> None:
    svc, leaves = pg_log
    size = len(leaves)
    ledger = Ledger(uncached(svc.settings), svc.db, svc.ledger._kek)
    await ledger.inclusion(0, size)
    held = ledger._nodes._held
    assert held is not None
    assert held.open_count == 1
    (conn,) = held._open
    task = asyncio.create_task(ledger.inclusion(9, size))
    await asyncio.sleep(0)  # its statement is sent
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conn.is_closed()
    assert held.open_count == 0
    assert await ledger.inclusion(9, size) == path(9, leaves)  # on a new one
    assert held.open_count == 1


@pytest.mark.postgres
async def test_disposing_of_the_database_closes_the_held_connections(
    pg_log: tuple[Services, list[bytes]],
) -> None:
    svc, leaves = pg_log
    size = len(leaves)
    ledger = Ledger(uncached(svc.settings), svc.db, svc.ledger._kek)
    assert await ledger.inclusion(2, size) == path(2, leaves)
    held = ledger._nodes._held
    assert held is not None
    (conn,) = held._open
    await svc.db.dispose()
    assert conn.is_closed()
    assert held.open_count == 0
    assert await ledger.consistency(3, size) == subproof(3, leaves, True)  # reopened


@pytest.mark.postgres
async def test_proofs_on_an_exhausted_database_fail_as_a_database_failure(
    pg_log: tuple[Services, list[bytes]], tmp_path: Path
) -> None:
    """The held connection cannot open (SQLSTATE 53300): the statement goes once more through
    SQLAlchemy, whose error the API answers 503 (``dependencies.database_failure``)."""
    svc, _ = pg_log
    role = f"tp_noconn_{secrets.token_hex(4)}"
    await pg_admin(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
    url = svc.settings.effective_database_url.replace("postgres@", f"{role}@", 1)
    db = Database(url)
    try:
        ledger = Ledger(uncached(svc.settings), db, svc.ledger._kek)
        with pytest.raises(sa_exc.DBAPIError) as caught:
            await ledger.inclusion(0, 37)
        assert database_failure(caught.value)
        assert ledger._nodes._held is not None
        assert ledger._nodes._held.open_count == 0
    finally:
        await db.dispose()
        await pg_admin(f"DROP ROLE IF EXISTS {role}")


def upper_nodes(leaves: list[bytes], min_level: int) -> dict[int, bytes]:
    """Every node of ``min_level`` and above in the tree of ``leaves``, independently built."""
    tree = merkle.MemoryTree(leaves)
    return {i: h for i, h in tree.nodes.items() if i >> merkle.LEVEL_SHIFT >= min_level}


async def test_the_upper_nodes_are_read_at_once_and_proofs_still_equal_the_rfc(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proof_nodes, "MIN_LEVEL", 2)
    await append(services.db, [event(i) for i in range(37)])
    await services.ledger.integrate_all()
    leaves = await leaf_hashes(services.ledger)
    size, upper = len(leaves), upper_nodes(leaves, 2)
    root = await signed_root(services, size)
    ledger = Ledger(uncached(services.settings), services.db, services.ledger._kek)
    assert len(upper) > 8  # (37 leaves and the log key's creation: levels 2-5)
    assert await ledger.warm() == len(upper)
    assert ledger._nodes.cached(upper) == (upper, [])
    assert ledger._nodes.cached([merkle.node_id(1, 0)])[1] == [merkle.node_id(1, 0)]
    for index in range(size):
        proof = await ledger.inclusion(index, size)
        assert proof == path(index, leaves), index
        assert merkle.verify_inclusion(index, size, leaves[index], proof, root), index


async def test_the_upper_nodes_kept_are_bounded_highest_first(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proof_nodes, "MIN_LEVEL", 2)
    monkeypatch.setattr(proof_nodes, "MAX_CACHED", 5)
    await append(services.db, [event(i) for i in range(37)])
    await services.ledger.integrate_all()
    leaves = await leaf_hashes(services.ledger)
    ledger = Ledger(uncached(services.settings), services.db, services.ledger._kek)
    assert await ledger.warm() == 5
    top = dict(sorted(upper_nodes(leaves, 2).items())[-5:])
    assert ledger._nodes.cached(top) == (top, [])
    await ledger.inclusion(0, len(leaves))  # reads lower nodes: none is kept past the bound
    assert len(ledger._nodes.cached(upper_nodes(leaves, 2))[0]) == 5
    assert await ledger.inclusion(3, len(leaves)) == path(3, leaves)


async def test_the_sequencer_keeps_the_upper_nodes_it_commits(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proof_nodes, "MIN_LEVEL", 2)
    ledger = Ledger(uncached(services.settings), services.db, services.ledger._kek)
    await ledger.integrate_all()
    await append(services.db, [event(i) for i in range(37)])
    await ledger.integrate_all()
    leaves = await leaf_hashes(ledger)
    upper = upper_nodes(leaves, 2)
    assert ledger._nodes.cached(upper) == (upper, [])


@pytest.mark.postgres
async def test_a_failing_proof_statement_fails_every_proof_sharing_it_as_sqlalchemy_error(
    pg_log: tuple[Services, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error each waiting proof gets is SQLAlchemy's (what the API maps to 503 when the
    database is lost), not asyncpg's own; the proofs after it are served."""
    svc, leaves = pg_log
    size = len(leaves)
    ledger = Ledger(uncached(svc.settings), svc.db, svc.ledger._kek)
    await ledger.inclusion(0, size)
    assert ledger._nodes._held is not None
    before = set(ledger._nodes._held._open)
    sql = proof_nodes._PG_NODES_SQL
    monkeypatch.setattr(proof_nodes, "_PG_NODES_SQL", sql.replace("audit_tree", "no_such_table"))
    failed = await asyncio.gather(
        *(ledger.inclusion(i, size) for i in range(4)), return_exceptions=True
    )
    assert all(isinstance(e, sa_exc.ProgrammingError) for e in failed), failed
    assert before <= set(ledger._nodes._held._open)  # refused by the server: connections kept
    monkeypatch.setattr(proof_nodes, "_PG_NODES_SQL", sql)
    assert await ledger.inclusion(1, size) == path(1, leaves)


async def test_the_right_edge_of_a_size_proved_is_kept(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every proof at a size shares its right edge: after one proof, the edge nodes below
    MIN_LEVEL it needed are in memory, and at another size the proofs still equal the RFC's."""
    await append(services.db, [event(i) for i in range(37)])
    await services.ledger.integrate_all()
    leaves = await leaf_hashes(services.ledger)
    size = len(leaves)
    ledger = Ledger(uncached(services.settings), services.db, services.ledger._kek)
    edge = [i for i in merkle.frontier_ids(size) if i >> merkle.LEVEL_SHIFT < proof_nodes.MIN_LEVEL]
    assert len(edge) > 1
    assert ledger._nodes.cached(edge)[1] == sorted(edge)
    assert await ledger.inclusion(0, size) == path(0, leaves)
    needed = merkle.needed_nodes(merkle.inclusion_ranges(0, size))
    kept = [i for i in edge if i in needed]
    assert kept
    assert ledger._nodes.cached(kept)[1] == []
    assert ledger._nodes.cached([merkle.node_id(0, 1)])[1] == [merkle.node_id(0, 1)]  # not edge
    monkeypatch.setattr(proof_nodes, "MAX_EDGE", 1)  # emptied when full
    for index in range(size - 5):
        assert await ledger.inclusion(index, size - 5) == path(index, leaves[: size - 5])
    assert len(ledger._nodes._edge) <= 1
