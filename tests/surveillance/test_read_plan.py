"""PostgreSQL: the detector's read of new leaves (``store.read_leaves``) finds them by the primary
key whatever the ledger's size was when its connection first planned it (docs/surveillance.md,
"The read of new leaves").

The read is prepared on each pooled connection (up to 20 a process), and PostgreSQL plans a prepared statement's first five executions with their
values, then keeps a generic plan only if it looks cheaper than those. With the open range it had
(``idx >= start ORDER BY idx LIMIT 5000``) and no statistics (autovacuum off, nothing running
``ANALYZE``: a third of the table estimated to match, every leaf fetched at random), those plans
were a sequential scan and a sort of the whole ledger until it held ~70,000 leaves."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from tests.conftest import PG_ADMIN_URL, require_service
from tests.storage.test_migrations import _admin
from trustplane.audit.tables import audit_leaves
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade
from trustplane.surveillance import store
from trustplane.surveillance.service import POSTGRESQL_BATCH

pytestmark = pytest.mark.postgres

#: A token load's entry is about 700 bytes: the leaves per page are a real ledger's.
ENTRY = '{"actor_chain":[],' + '"x":"' + "x" * 680 + '"}'


@pytest.fixture
async def fresh_db() -> AsyncIterator[Database]:
    """A new migrated database: no statistics left by another test's ``ANALYZE``."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"tp_readplan_{secrets.token_hex(4)}"
    await _admin(f'CREATE DATABASE "{name}"')
    db = Database(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        await upgrade(db)
        yield db
    finally:
        await db.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _leaves(conn: AsyncConnection, start: int, end: int) -> None:
    if start == end:
        return
    rows = [
        {
            "idx": i,
            "entry": ENTRY,
            "event_id": f"{i:032x}",
            "type": "policy:decision:allowed",
            "time_ms": 1_700_000_000_000 + i,
            "client_id": "c",
            "subject": "s",
            "integrated_at": 0,
        }
        for i in range(start, end)
    ]
    await conn.execute(insert(audit_leaves), rows)


async def _seq_scans(conn: AsyncConnection) -> int:
    """This transaction's sequential scans of ``audit_leaves`` so far."""
    sql = "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'audit_leaves'"
    return int((await conn.exec_driver_sql(sql)).scalar() or 0)


@pytest.mark.parametrize("analyze", [False, True], ids=["no statistics", "stale statistics"])
@pytest.mark.parametrize("first_round", [0, 20_000])
async def test_rounds_read_no_whole_ledger_while_it_grows(
    fresh_db: Database, first_round: int, analyze: bool
) -> None:
    """Rounds of the detector's size on one connection (a pooled one: its first round may come
    when the ledger already holds ``first_round`` leaves) while a
    new deployment's ledger grows to 100,000 leaves: each round reads its leaves by the primary
    key, never by a sequential scan of the ledger, with no statistics or with those of an
    ``ANALYZE`` made at the first size. Before: with no statistics a connection's first five
    rounds (custom plans) scanned and sorted the whole ledger (at 60,000 leaves in parallel),
    until ~70,000 leaves; the rounds on a connection that began at 0 did again at 30,000."""
    scans: dict[int, int] = {}
    async with fresh_db.transaction() as conn:
        await _leaves(conn, 0, first_round)
        if analyze:
            await conn.exec_driver_sql("ANALYZE audit_leaves")
        size = first_round
        for grown in (first_round, 30_000, 40_000, 60_000, 100_000):
            await _leaves(conn, size, max(size, grown))
            size = max(size, grown)
            before = await _seq_scans(conn)
            for behind in (6_000, 2_500, 1_000, 300, 0):  # a round's start, before the log's end
                start = max(0, size - behind)
                rows = await store.read_leaves(conn, start, POSTGRESQL_BATCH)
                expected = list(range(start, min(start + POSTGRESQL_BATCH, size)))
                assert [r[0] for r in rows] == expected
            if size:  # a scan of the empty table reads nothing (and is its plan once ANALYZEd)
                scans[size] = await _seq_scans(conn) - before
    assert scans == dict.fromkeys(scans, 0)  # per ledger size: rounds that scanned it whole
