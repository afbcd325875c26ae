"""The ledger's periodic reads stay index reads as the log grows: the leaf types (retention's
``"*"`` period, once a minute in every process) are one index probe per type, never a scan of
every leaf."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, insert

from trustplane.audit import store
from trustplane.audit.tables import audit_leaves
from trustplane.storage.db import Database

TYPES = ("oauth:token:issued", "policy:decision:allowed", "policy:decision:denied")


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.dispose()


async def _leaves(db: Database, count: int) -> None:
    rows = [
        {
            "idx": i,
            "entry": "{}",
            "event_id": f"{i:032x}",
            "type": TYPES[i % 3 if i % 100 else 2],  # the denials are rare
            "time_ms": i,
            "integrated_at": i,
        }
        for i in range(count)
    ]
    async with db.transaction() as conn:
        await conn.execute(insert(audit_leaves), rows)


async def _leaf_types(db: Database) -> tuple[list[str], list[str]]:
    """The types, and the statements that read them."""
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with db.read() as conn:
            types = await store.leaf_types(conn)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", seen)
    return types, statements


async def test_the_leaf_types_are_each_type_once_in_order(db: Database) -> None:
    assert (await _leaf_types(db))[0] == []
    await _leaves(db, 300)
    assert (await _leaf_types(db))[0] == list(TYPES)


@pytest.mark.postgres
async def test_the_leaf_types_read_no_leaf_twice_on_postgresql(pg_url: str) -> None:
    """``SELECT DISTINCT type`` was a sequential scan and a hash aggregate over every leaf (117 ms
    at 300,000 leaves); the types come from ``ix_audit_leaves_type_time``, a probe each."""
    db = Database(pg_url)
    try:
        await _leaves(db, 6000)
        async with db.transaction() as conn:
            await conn.exec_driver_sql("ANALYZE audit_leaves")
        types, statements = await _leaf_types(db)
        (sql,) = [s for s in statements if "audit_leaves" in s]
        async with db.read() as conn:
            plan = "\n".join(
                row[0] for row in (await conn.exec_driver_sql(f"EXPLAIN (ANALYZE) {sql}")).all()
            )
    finally:
        await db.dispose()
    assert "Seq Scan on audit_leaves" not in plan, plan
    assert "Index Only Scan using ix_audit_leaves_type_time" in plan, plan
    assert types == list(TYPES)
