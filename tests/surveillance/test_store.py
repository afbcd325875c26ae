"""The detector's idle check (``store.has_unread``): true exactly when a leaf lies at or past the
cursor, on SQLite and PostgreSQL; on PostgreSQL it reads the primary key's end, never the table."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import insert
from sqlalchemy.dialects import postgresql

from trustplane.audit.tables import audit_leaves
from trustplane.storage.db import Database
from trustplane.surveillance import store
from trustplane.surveillance.tables import surveillance_cursor


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.dispose()


async def _leaves(db: Database, start: int, end: int) -> None:
    rows = [
        {
            "idx": i,
            "entry": "{}",
            "event_id": f"{i:032x}",
            "type": "policy:decision:allowed",
            "time_ms": i,
            "integrated_at": i,
        }
        for i in range(start, end)
    ]
    async with db.transaction() as conn:
        await conn.execute(insert(audit_leaves), rows)


async def _cursor(db: Database, position: int) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            insert(surveillance_cursor).values(name=store.CURSOR, position=position, updated_at=0)
        )


async def _unread(db: Database) -> bool:
    async with db.read() as conn:
        return await store.has_unread(conn)


async def test_unread_means_a_leaf_at_or_past_the_cursor(db: Database) -> None:
    assert not await _unread(db)  # an empty log, no cursor
    await _leaves(db, 0, 3)
    assert await _unread(db)  # no cursor: read from 0
    await _cursor(db, 3)
    assert not await _unread(db)  # the cursor is past the last leaf
    await _leaves(db, 3, 4)
    assert await _unread(db)


@pytest.mark.postgres
async def test_the_idle_check_reads_no_leaf_it_has_read_on_postgresql(pg_url: str) -> None:
    """``EXISTS (leaf with idx >= cursor)`` got a sequential scan of ``audit_leaves`` from the
    planner, through every leaf already read (78 ms a round at 300,000 leaves, every second in
    every process); the check reads the primary key's last entry instead."""
    db = Database(pg_url)
    try:
        await _leaves(db, 0, 5000)
        await _cursor(db, 5000)
        async with db.transaction() as conn:
            await conn.exec_driver_sql("ANALYZE audit_leaves")
        sql = str(
            store._UNREAD.compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
            )
        )
        async with db.read() as conn:
            plan = "\n".join(
                row[0]
                for row in (await conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")).all()
            )
        assert not await _unread(db)
    finally:
        await db.dispose()
    assert "Seq Scan on audit_leaves" not in plan, plan
    assert "Rows Removed by Filter" not in plan, plan
