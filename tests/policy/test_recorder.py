"""Recording decisions through the group-commit writer: both rows durable (the ledger entry and the
replay inputs), on SQLite and PostgreSQL; on PostgreSQL a batch of decisions is one statement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy import event, select

from tests.policy.conftest import order_request
from trustplane.audit.canonical import entry_parts
from trustplane.audit.sink import recent_events
from trustplane.audit.tables import audit_pending
from trustplane.policy.bundle import CompiledBundle
from trustplane.policy.engine import PolicyEngine
from trustplane.policy.recorder import DecisionRecord, DecisionRecorder, write_alone
from trustplane.policy.tables import policy_decisions
from trustplane.storage.db import Database
from trustplane.storage.driver_sql import VALUES_ROWS
from trustplane.storage.writer import GroupCommitWriter


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.dispose()


async def decide_concurrently(
    db: Database, bundle: CompiledBundle, n: int
) -> tuple[list[str], int]:
    """``n`` decisions in flight at once: their decision ids and the writer's batches."""
    writer = GroupCommitWriter(db)
    engine = PolicyEngine(
        issuer="https://as.test", served_regions=["eu"], recorder=DecisionRecorder(writer)
    )
    engine.activate(bundle)
    writer.start()
    try:
        requests = [order_request() for _ in range(n)]
        decisions = await asyncio.gather(*(engine.decide_many([r]) for r in requests))
    finally:
        await writer.stop()
    assert all(d.allowed for (d,) in decisions)
    return [d.decision_id for (d,) in decisions], writer.batches


async def test_each_decision_is_in_the_ledger_and_replayable(
    db: Database, default_compiled: CompiledBundle
) -> None:
    ids, _ = await decide_concurrently(db, default_compiled, 5)
    events = await recent_events(db, type_="policy:decision:allowed")
    assert sorted(e["event_id"] for e in events) == sorted(ids)
    async with db.read() as conn:
        rows = (await conn.execute(select(policy_decisions))).mappings().all()
    assert sorted(r["decision_id"] for r in rows) == sorted(ids)
    for row in rows:
        inputs = orjson.loads(row["inputs"])
        assert inputs["request"]["action"] == {"type": "Action", "id": "order:create"}
        assert row["allowed"] is True
        assert row["bundle_version"] == default_compiled.version


@pytest.mark.postgres
async def test_a_batch_of_decisions_is_one_statement_on_postgresql(
    pg_url: str, default_compiled: CompiledBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger rows and the replay inputs of a batch go in one execution (the inputs' insert a
    CTE of the ledger's), sent to asyncpg directly: before, two (one through SQLAlchemy)."""
    db = Database(pg_url)
    statements: list[str] = []

    def through_sqlalchemy(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    original = asyncpg.Connection.execute

    async def on_the_driver(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> str:
        statements.append(query)
        return await original(self, query, *args, **kw)  # type: ignore[no-any-return]

    event.listen(db.autocommit_engine.sync_engine, "before_cursor_execute", through_sqlalchemy)
    monkeypatch.setattr(asyncpg.Connection, "execute", on_the_driver)
    try:
        ids, batches = await decide_concurrently(db, default_compiled, 8)
    finally:
        monkeypatch.undo()
        event.remove(db.autocommit_engine.sync_engine, "before_cursor_execute", through_sqlalchemy)
    inserts = [s for s in statements if "INSERT" in s.upper()]
    async with db.read() as conn:
        stored = (await conn.execute(select(policy_decisions.c.decision_id))).scalars().all()
    await db.dispose()
    assert sorted(stored) == sorted(ids)
    assert len(inserts) == batches  # one per batch, however many decisions it holds
    assert all("policy_decisions" in s and "audit_pending" in s for s in inserts), inserts


async def _driver_statements(
    pg_url: str, bundle: CompiledBundle, monkeypatch: pytest.MonkeyPatch, n: int
) -> tuple[list[str], list[str], int]:
    """Every statement sent to asyncpg while ``n`` decisions are recorded, the decision ids stored,
    and the writer's batches."""
    db = Database(pg_url)
    statements: list[str] = []
    original = asyncpg.Connection.execute

    async def on_the_driver(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> str:
        statements.append(query.strip().upper()[:60])
        return await original(self, query, *args, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(asyncpg.Connection, "execute", on_the_driver)
    try:
        ids, batches = await decide_concurrently(db, bundle, n)
    finally:
        monkeypatch.undo()
    async with db.read() as conn:
        stored = (await conn.execute(select(policy_decisions.c.decision_id))).scalars().all()
    await db.dispose()
    assert sorted(stored) == sorted(ids)
    return statements, list(stored), batches


@pytest.mark.postgres
async def test_a_batch_of_decisions_commits_on_its_own_on_postgresql(
    pg_url: str, default_compiled: CompiledBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``BEGIN`` and ``COMMIT`` around the batch's one statement (before: three round trips a
    batch); the statement's rows are durable, the ledger's entries there."""
    statements, stored, batches = await _driver_statements(pg_url, default_compiled, monkeypatch, 6)
    assert len(stored) == 6
    assert not [s for s in statements if s.startswith(("BEGIN", "COMMIT"))], statements
    assert len(statements) == batches


@pytest.mark.postgres
async def test_decisions_an_observer_writes_for_are_recorded_in_a_transaction(
    pg_url: str, default_compiled: CompiledBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An audit-sink observer that writes for the decisions' events (none does today: the SSF
    index writes for issued tokens) gets the transaction the decisions are written in."""
    from trustplane.audit import sink

    seen: list[int] = []

    async def observer(conn: Any, events: Any) -> None:
        await conn.exec_driver_sql("SELECT 1")
        seen.append(len(events))

    monkeypatch.setattr(sink, "OBSERVERS", [observer])
    statements, stored, _ = await _driver_statements(pg_url, default_compiled, monkeypatch, 3)
    assert (len(stored), sum(seen)) == (3, 3)
    assert any(s.startswith("BEGIN") for s in statements), statements


def _records(bundle: CompiledBundle, n: int) -> list[DecisionRecord]:
    engine = PolicyEngine(issuer="https://as.test", served_regions=["eu"])
    engine.activate(bundle)
    return [record for _, record in engine.evaluate([order_request() for _ in range(n)])]


@pytest.mark.postgres
async def test_a_decision_alone_is_written_without_arrays_on_postgresql(
    pg_url: str, default_compiled: CompiledBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One decision a batch (a PDP asked one question at a time) binds scalar parameters: no
    array per column for asyncpg to pack and the server to unnest (before: fourteen one-element
    arrays); so does a batch of two (before: arrays) and of ``VALUES_ROWS``; a larger batch binds
    one array per column."""
    db = Database(pg_url)
    sent: list[tuple[str, tuple[Any, ...]]] = []
    original = asyncpg.Connection.execute

    async def on_the_driver(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> str:
        sent.append((query, args))
        return await original(self, query, *args, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(asyncpg.Connection, "execute", on_the_driver)
    try:
        await decide_concurrently(db, default_compiled, 1)
        await decide_concurrently(db, default_compiled, 1)
        alone = list(sent)
        sent.clear()
        async with db.autocommit_engine.connect() as conn:
            for n in (2, VALUES_ROWS, VALUES_ROWS + 1):
                await write_alone(conn, [_records(default_compiled, n)])
    finally:
        monkeypatch.undo()
        await db.dispose()
    assert len(alone) == 2, alone
    for query, args in [*alone, *sent[:2]]:
        assert "unnest" not in query, query
        assert not [a for a in args if isinstance(a, list)], args
    assert [len(args) for _, args in sent[:2]] == [2 * 21, VALUES_ROWS * 21]
    query, args = sent[2]
    assert "unnest" in query, query
    assert all(isinstance(a, list) and len(a) == VALUES_ROWS + 1 for a in args), args


@pytest.mark.postgres
async def test_a_decision_alone_and_a_batch_write_the_same_rows_on_postgresql(
    pg_url: str, default_compiled: CompiledBundle
) -> None:
    """Whichever statement carries them, the rows are the records': the replay inputs column by
    column, the ledger's pending (entry, payload, salt) in the order appended, each entry the
    one its event makes with the stored salt."""
    records = _records(default_compiled, 3)
    db = Database(pg_url)
    try:
        async with db.autocommit_engine.connect() as conn:
            await write_alone(conn, [[records[0]]])
            await write_alone(conn, [records[1:]])
        async with db.read() as conn:
            stored = (await conn.execute(select(policy_decisions))).all()
            pending = (
                await conn.execute(
                    select(
                        audit_pending.c.entry, audit_pending.c.payload, audit_pending.c.salt
                    ).order_by(audit_pending.c.id)
                )
            ).all()
    finally:
        await db.dispose()
    assert sorted(tuple(row) for row in stored) == sorted(r.row() for r in records)
    assert [
        (entry.encode(), payload.encode(), bytes(salt)) for entry, payload, salt in pending
    ] == [entry_parts(r.event, bytes(row[2])) for r, row in zip(records, pending, strict=True)]
