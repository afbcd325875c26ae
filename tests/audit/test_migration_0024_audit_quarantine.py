"""Migration ``0024_audit_quarantine`` (pending entries the sequencer could not integrate) up, down and
up again, on SQLite and PostgreSQL; the final schema is exactly ``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

TABLE = "audit_quarantine"


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))


async def test_0024_audit_quarantine_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, "0019_initial_access_token_lei")
    assert TABLE not in await _tables(empty_db)

    await upgrade(empty_db, "0024_audit_quarantine")
    assert TABLE in await _tables(empty_db)
    assert await _current(empty_db) == "0024_audit_quarantine"

    await _downgrade(empty_db, "0019_initial_access_token_lei")
    assert TABLE not in await _tables(empty_db)

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
