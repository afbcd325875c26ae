"""The minute's look for newly expired mandates reads the due ones only: never the mandates that
expired and were announced long ago, nor the revoked ones (they only grow)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import event

from trustplane.mandates.model import MandateStatus
from trustplane.mandates.store import SqlMandateStore
from trustplane.storage.db import Database

NOW = int(time.time())
ROWS = 5000


async def _due(db: Database) -> tuple[list[str], str]:
    """The due mandates, and the plan of the statement that found them."""
    seen: list[tuple[str, Any]] = []

    def record(_c: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if "FROM mandates" in statement:
            seen.append((statement, parameters))

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        async with db.read() as conn:
            due = await SqlMandateStore().expired_unnotified(conn, NOW, 100)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)
    ((sql, params),) = seen
    async with db.read() as conn:
        plan = (await conn.exec_driver_sql(f"EXPLAIN {sql}", params)).all()
    return due, "\n".join(r[0] for r in plan)


def test_the_index_predicate_names_the_live_statuses() -> None:
    from trustplane.mandates.tables import EXPIRY_DUE

    assert f"'{MandateStatus.ACTIVE.value}', '{MandateStatus.SUSPENDED.value}'" in EXPIRY_DUE


async def test_expired_unnotified_finds_the_due_ones(db_url: str) -> None:
    db = Database(db_url)
    try:
        async with db.transaction() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO mandates (id, current_version, status, grantor_lei, grantee_client_id,"  # noqa: S608
                " effective_from, effective_until, created_at, updated_at, expiry_notified_at,"
                " row_version) VALUES"
                f" ('notified', 1, 'active', 'L', 'c', 0, {NOW - 50}, 0, 0, {NOW - 40}, 1),"
                f" ('revoked', 1, 'revoked', 'L', 'c', 0, {NOW - 40}, 0, 0, NULL, 1),"
                f" ('due', 1, 'suspended', 'L', 'c', 0, {NOW - 30}, 0, 0, NULL, 1),"
                f" ('due2', 1, 'active', 'L', 'c', 0, {NOW}, 0, 0, NULL, 1),"
                f" ('live', 1, 'active', 'L', 'c', 0, {NOW + 10}, 0, 0, NULL, 1),"
                f" ('open', 1, 'active', 'L', 'c', 0, NULL, 0, 0, NULL, 1)"
            )
        async with db.read() as conn:
            assert await SqlMandateStore().expired_unnotified(conn, NOW, 100) == ["due", "due2"]
            assert await SqlMandateStore().expired_unnotified(conn, NOW, 1) == ["due"]
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_expired_unnotified_reads_the_due_mandates_only_on_postgresql(pg_url: str) -> None:
    """Through ``ix_mandates_effective_until`` the look read every mandate that ever expired or
    was revoked before the first due one, every minute in every process; with no statistics
    (autovacuum off) PostgreSQL read every active mandate by status instead."""
    db = Database(pg_url)
    try:
        async with db.transaction() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO mandates (id, current_version, status, grantor_lei, grantee_client_id,"  # noqa: S608
                " effective_from, effective_until, created_at, updated_at, expiry_notified_at,"
                " row_version) SELECT 'm' || i, 1, CASE WHEN i % 10 = 0 THEN 'revoked'"
                f" ELSE 'active' END, 'L', 'c', 0, {NOW} - {ROWS} + i + 2, 0, 0,"
                f" CASE WHEN i % 10 <> 0 AND {NOW} - {ROWS} + i + 2 <= {NOW} - 3 THEN {NOW} END, 1"
                f" FROM generate_series(1, {ROWS}) i"
            )
        for analyze in (False, True):
            if analyze:
                async with db.transaction() as conn:
                    await conn.exec_driver_sql("ANALYZE mandates")
            due, plan = await _due(db)
            assert due == [f"m{ROWS - 4}", f"m{ROWS - 3}", f"m{ROWS - 2}"], due
            assert "Seq Scan" not in plan, plan
            assert "Index Scan using ix_mandates_expiry_due" in plan, plan
    finally:
        await db.dispose()
