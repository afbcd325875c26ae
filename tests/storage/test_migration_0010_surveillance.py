"""Migration ``0010_surveillance`` (the detector's cursor and state, docs/surveillance.md) up, down
and up again, on SQLite and PostgreSQL; the final schema is exactly ``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

TABLES = {
    "surveillance_cursor",
    "surveillance_delegation",
    "surveillance_actor_pairs",
    "surveillance_windows",
}


async def _surveillance_tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    return TABLES & names


async def test_0010_surveillance_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, "0009_ledger_ingest")
    assert await _surveillance_tables(empty_db) == set()

    await upgrade(empty_db, "0010_surveillance")
    assert await _surveillance_tables(empty_db) == TABLES
    assert await _current(empty_db) == "0010_surveillance"

    await _downgrade(empty_db, "0009_ledger_ingest")
    assert await _surveillance_tables(empty_db) == set()

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
