"""The windows' prune (``store.prune_windows``, every minute in every process) deletes a signal's
windows before a bucket and reads those alone: a range of ``ix_surveillance_windows_signal_bucket``
on PostgreSQL, with no statistics, ANALYZEd and with statistics gone stale, and on SQLite. Through
the primary key (signal, key, bucket) it read every window of the signal."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, insert, select

from tests.storage.test_prune import _statements
from trustplane.storage.db import Database
from trustplane.surveillance import store
from trustplane.surveillance.tables import surveillance_windows

INDEX = "ix_surveillance_windows_signal_bucket"
SIGNAL, OTHER = "issuance.spike", "partner.claim_failures"
KEYS, BUCKETS = 40, 100


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.dispose()


async def _windows(db: Database, first: int) -> None:
    """KEYS windows in each bucket from ``first`` on, of both signals."""
    rows = [
        {"signal": s, "key": f"client-{k}", "bucket": b, "count": 1, "first_index": 0}
        for s in (SIGNAL, OTHER)
        for k in range(KEYS)
        for b in range(first, first + BUCKETS)
    ]
    async with db.transaction() as conn:
        await conn.execute(insert(surveillance_windows), rows)


async def _left(db: Database) -> dict[str, tuple[int, int, int]]:
    """Per signal: windows left, their oldest and newest bucket."""
    t = surveillance_windows
    async with db.read() as conn:
        rows = await conn.execute(
            select(t.c.signal, func.count(), func.min(t.c.bucket), func.max(t.c.bucket)).group_by(
                t.c.signal
            )
        )
        return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows.all()}


async def _prune(db: Database, before: int) -> tuple[int, str]:
    """What the prune deleted, and its statement's plan (EXPLAIN on PostgreSQL, EXPLAIN QUERY PLAN
    on SQLite)."""
    deleted, statements = await _statements(
        db, lambda _db, conn: store.prune_windows(conn, SIGNAL, before)
    )
    assert len(statements) == 1, statements
    sql, params = statements[0]
    explain = "EXPLAIN QUERY PLAN" if db.is_sqlite else "EXPLAIN"
    async with db.read() as conn:
        rows = (await conn.exec_driver_sql(f"{explain} {sql}", params)).all()
    return deleted, "\n".join(str(r[-1]) for r in rows)


async def test_the_prune_deletes_the_signals_windows_before_the_bucket(db: Database) -> None:
    await _windows(db, 1000)
    async with db.transaction() as conn:
        assert await store.prune_windows(conn, SIGNAL, 1000) == 0  # nothing before
        assert await store.prune_windows(conn, SIGNAL, 1010) == 10 * KEYS
    assert await _left(db) == {
        SIGNAL: ((BUCKETS - 10) * KEYS, 1010, 1099),
        OTHER: (BUCKETS * KEYS, 1000, 1099),
    }
    async with db.transaction() as conn:
        await conn.execute(surveillance_windows.delete())
        assert await store.prune_windows(conn, SIGNAL, 5000) == 0  # an empty table


def _reads_the_range(plan: str, sqlite: bool) -> None:
    # SQLite: SEARCH surveillance_windows USING INDEX ix_... (signal=? AND bucket>? AND bucket<?)
    if sqlite:
        assert f"INDEX {INDEX} (signal=? AND bucket" in plan, plan
        return
    assert "Seq Scan on surveillance_windows" not in plan, plan
    assert "pk_surveillance_windows" not in plan, plan
    assert f"Index Scan using {INDEX}" in plan or f"Bitmap Index Scan on {INDEX}" in plan, plan


async def test_the_prune_reads_the_windows_it_deletes(db: Database) -> None:
    """With no statistics (PostgreSQL with autovacuum off: never ANALYZEd), ANALYZEd, and with
    statistics that no longer describe the table (ANALYZEd, then days of windows later: every
    bucket they know lies below the bound, so PostgreSQL plans an open range to match them all and
    reads the table)."""
    await _windows(db, 1000)
    deleted, plan = await _prune(db, 1010)
    assert deleted == 10 * KEYS
    _reads_the_range(plan, db.is_sqlite)

    async with db.transaction() as conn:
        await conn.exec_driver_sql("ANALYZE surveillance_windows")
    deleted, plan = await _prune(db, 1020)
    assert deleted == 10 * KEYS
    _reads_the_range(plan, db.is_sqlite)

    async with db.transaction() as conn:  # the statistics stay those of buckets 1010-1099
        await conn.execute(surveillance_windows.delete())
    await _windows(db, 5000)
    deleted, plan = await _prune(db, 5010)
    assert deleted == 10 * KEYS
    _reads_the_range(plan, db.is_sqlite)
