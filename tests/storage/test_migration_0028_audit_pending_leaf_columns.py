"""Migration ``0028_audit_pending_leaf_columns`` (the pending row carries the leaf's index columns)
up, down and up again, on SQLite and PostgreSQL: a pending row written before it keeps its entry and
has no columns (the sequencer parses it); the final schema is exactly ``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect, text

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

BEFORE, AFTER = "0027_authorization_answers", "0028_audit_pending_leaf_columns"
COLUMNS = {"event_id", "type", "time_ms", "subject", "client_id", "partner", "transaction_id"}


async def _columns(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: {c["name"] for c in inspect(sync).get_columns("audit_pending")}
        )


async def test_0028_audit_pending_leaf_columns_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, BEFORE)
    assert not COLUMNS & await _columns(empty_db)
    async with empty_db.transaction() as conn:
        await conn.execute(
            text("INSERT INTO audit_pending (entry, payload, salt) VALUES ('{}', '{}', :s)"),
            {"s": b"salt"},
        )

    await upgrade(empty_db, AFTER)
    assert await _current(empty_db) == AFTER
    assert await _columns(empty_db) >= COLUMNS
    async with empty_db.read() as conn:
        rows = (await conn.execute(text("SELECT entry, time_ms, subject FROM audit_pending"))).all()
    assert [tuple(r) for r in rows] == [("{}", None, None)]

    await _downgrade(empty_db, BEFORE)
    assert not COLUMNS & await _columns(empty_db)
    assert await _current(empty_db) == BEFORE

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
