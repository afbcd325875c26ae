"""PostgreSQL: the reads of the ledger's pending queue keep their primary-key plans after a VACUUM
of the emptied queue (docs/ledger.md, "The pending queue on PostgreSQL").

The poll (``PG_HAS_PENDING_SQL``) and the sequencer's batch reads are prepared on long-lived
connections, and PostgreSQL keeps a generic plan for them. A VACUUM that truncated the emptied
queue to no pages (the sequencer's own, every 20,000 entries, or an operator's) left statistics
saying "empty": the statements were planned again as sequential scans and kept those plans, with no
ANALYZE to replan them, while the next entries' dead rows piled up (each read went through all of
them)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from trustplane.audit import store
from trustplane.storage.db import Database

pytestmark = pytest.mark.postgres

#: The queue's reads, as the sequencer and its poll send them (name, statement, arguments).
READS = (
    ("has_pending", store.PG_HAS_PENDING_SQL, ""),
    ("take_pending", "SELECT id, entry FROM audit_pending ORDER BY id LIMIT $1", "(2048)"),
    (
        "state_and_pending",
        "SELECT s.tree_size, s.root, p.id, p.entry FROM audit_log_state s "
        "LEFT JOIN LATERAL (SELECT id, entry FROM audit_pending ORDER BY id LIMIT $1) p ON true "
        "WHERE s.id = 1 ORDER BY p.id",
        "(2048)",
    ),
)


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url)
    yield database
    await database.dispose()


async def _queue(driver: object, rows: int, keep: int) -> None:
    """``rows`` entries appended and all but the last ``keep`` integrated (deleted)."""
    run = driver.execute  # type: ignore[attr-defined]
    await run(
        "INSERT INTO audit_pending (entry, payload, salt) "
        "SELECT repeat('x', 600), '{}', '\\x00'::bytea FROM generate_series(1, $1)",
        rows,
    )
    await run(
        "DELETE FROM audit_pending WHERE id <= (SELECT max(id) FROM audit_pending) - $1", keep
    )


@pytest.mark.parametrize("vacuum", ["sequencer", "operator"])
async def test_the_pending_reads_keep_the_primary_key_after_a_vacuum(
    db: Database, vacuum: str
) -> None:
    async with db.autocommit_engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        await driver.execute(
            "INSERT INTO audit_log_state VALUES (1, 0, '\\x00'::bytea, 0) ON CONFLICT DO NOTHING"
        )
        await _queue(driver, 2000, 0)  # 2,000 entries moved: the sequencer vacuums
        if vacuum == "sequencer":
            await store.pg_vacuum_pending(conn)
        else:
            await driver.execute("VACUUM audit_pending")
        await _queue(driver, 3, 3)  # a few entries pending: the reads prepared and planned
        for name, sql, _ in READS:
            await driver.execute(f"PREPARE {name} AS {sql}")
        for _ in range(6):  # the sixth execution on, a generic plan is kept
            for name, _, args in READS:
                await driver.execute(f"EXECUTE {name}{args}")
        await _queue(driver, 5000, 10)  # the next entries come and go: dead rows
        for name, _, args in READS:
            plan = "\n".join(
                r[0] for r in await driver.fetch(f"EXPLAIN (COSTS OFF) EXECUTE {name}{args}")
            )
            assert "Seq Scan on audit_pending" not in plan, (name, plan)
            assert "using pk_audit_pending on audit_pending" in plan, (name, plan)
        for name, _, _ in READS:
            await driver.execute(f"DEALLOCATE {name}")
