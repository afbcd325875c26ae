"""PostgreSQL: :func:`claim_all`, the writer's one-statement claim of a batch's ``jti`` values, is a
plain ``INSERT``: no speculative insertion per row (no ``ON CONFLICT`` arbiter), one WAL record per
row on the table's heap; a ``jti`` in the table fails it as a whole, and the batch then runs the
transactional way, which still takes an expired, not yet pruned ``jti`` back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.errors import InvalidClientError
from trustplane.grant.outcomes import ConsumeJti, Outcome, OutcomeRecorder
from trustplane.protocol.replay import Replayed, ReplayUse, claim_all
from trustplane.storage.db import Database
from trustplane.storage.writer import GroupCommitWriter

pytestmark = pytest.mark.postgres
ISSUER = "http://127.0.0.1:8000"


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url)
    yield database
    await database.dispose()


class _Recording:
    """An asyncpg connection that remembers the statements sent through ``execute``."""

    def __init__(self, driver: Any) -> None:
        self.driver, self.sent = driver, []  # type: list[tuple[str, tuple[Any, ...]]]

    async def execute(self, sql: str, *args: Any) -> Any:
        self.sent.append((sql, args))
        return await self.driver.execute(sql, *args)


def _uses(*jtis: str, expires_at: int = 2**40) -> list[ReplayUse]:
    return [ReplayUse("client-a", jti, expires_at) for jti in jtis]


async def _used(db: Database) -> list[tuple[Any, ...]]:
    async with db.read() as conn:
        sql = "SELECT jti, expires_at FROM used_jtis ORDER BY jti"
        return [tuple(r) for r in (await conn.exec_driver_sql(sql)).all()]


async def test_the_claim_has_no_conflict_arbiter(db: Database) -> None:
    """Fails on the old code: the claim was an upsert (``ON CONFLICT ... DO UPDATE``), whose plan
    shows "Conflict Resolution: UPDATE"."""
    async with db.autocommit_engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        recording = _Recording(driver)
        await claim_all(recording, _uses("j0", "j1"), ())
        [(sql, args)] = recording.sent
        plan = "\n".join(r[0] for r in await driver.fetch(f"EXPLAIN (VERBOSE) {sql}", *args))

    assert "Insert on public.used_jtis" in plan
    assert "Conflict" not in plan
    assert await _used(db) == [("j0", 2**40), ("j1", 2**40)]


async def test_claiming_writes_one_heap_record_per_jti(db: Database) -> None:
    """Fails on the old code: 16 heap records for 8 ``jti`` values (each insert speculative, then
    confirmed by a record of its own). Counted with ``pg_walinspect`` on this database's
    ``used_jtis`` heap only, so other databases' WAL does not count."""
    async with db.autocommit_engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        await driver.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        node = await driver.fetchval(
            "SELECT format('rel %s/%s/%s', t.oid, d.oid, pg_relation_filenode('used_jtis')) "
            "FROM pg_database d, pg_tablespace t "
            "WHERE d.datname = current_database() AND t.spcname = 'pg_default'"
        )
        start = await driver.fetchval("SELECT pg_current_wal_insert_lsn()")
        await claim_all(driver, _uses(*(f"j{i}" for i in range(8))), ())
        end = await driver.fetchval("SELECT pg_current_wal_flush_lsn()")  # committed: flushed
        records = await driver.fetch(
            "SELECT record_type FROM pg_get_wal_records_info($1, $2) "
            "WHERE resource_manager = 'Heap' AND block_ref LIKE $3",
            start,
            end,
            f"%{node} %",
        )

    # INSERT, or INSERT+INIT for the first row on a new page; the upsert added a CONFIRM each
    assert [r["record_type"].split("+")[0] for r in records] == ["INSERT"] * 8


async def test_a_used_jti_fails_the_claim_and_writes_nothing(db: Database) -> None:
    async with db.autocommit_engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        await claim_all(driver, _uses("j1"), ())
        alongside = ("INSERT INTO audit_tree (id, hash) VALUES ($1, '\\x00')", [7])
        with pytest.raises(Replayed):
            await claim_all(driver, _uses("j0", "j1"), [alongside])
        assert await driver.fetchval("SELECT count(*) FROM audit_tree") == 0

    assert await _used(db) == [("j1", 2**40)]


async def test_another_key_violated_is_not_taken_for_a_replay(db: Database) -> None:
    """A duplicate in another table of the statement is that table's error, raised as it is: the
    batch is not answered as if a ``jti`` had been replayed."""
    import asyncpg  # type: ignore[import-untyped]

    async with db.autocommit_engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        alongside = ("INSERT INTO audit_tree (id, hash) VALUES ($1, '\\x00'), ($1, '\\x01')", [7])
        with pytest.raises(asyncpg.UniqueViolationError) as raised:
            await claim_all(driver, _uses("j0"), [alongside])

    assert raised.value.constraint_name == "pk_audit_tree"
    assert await _used(db) == []


def _outcomes(jtis: Sequence[str]) -> list[Outcome]:
    def refused(error: Any) -> AuditEvent:
        return AuditEvent(
            type=AuditEventType.TOKEN_REFUSED, issuer=ISSUER, client_id="c", decision="deny"
        )

    return [
        Outcome(
            event=AuditEvent(
                type=AuditEventType.TOKEN_ISSUED, issuer=ISSUER, client_id="c", decision="allow"
            ),
            refused=refused,
            conditions=(ConsumeJti(ReplayUse("client-a", jti, 2**40), InvalidClientError()),),
            decisions=(),
        )
        for jti in jtis
    ]


async def test_an_expired_jti_not_yet_pruned_is_taken_back(db: Database) -> None:
    """The one statement fails on the expired row's key; the batch's transaction takes it back
    (its upsert claims a row whose ``expires_at`` has passed), and every request is issued."""
    async with db.transaction() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO used_jtis (issuer, jti, expires_at) VALUES ('client-a', 'j1', 5)"
        )
    writer = GroupCommitWriter(db)
    OutcomeRecorder(writer)
    writer.start()
    try:
        outcomes = _outcomes(["j0", "j1", "j2"])
        failed = await asyncio.gather(*(writer.submit("token_outcome", o) for o in outcomes))
    finally:
        await writer.stop()

    assert failed == [None, None, None]
    assert await _used(db) == [("j0", 2**40), ("j1", 2**40), ("j2", 2**40)]
