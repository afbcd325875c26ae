"""Migration ``0013_mandate_expiry_due`` (a partial index of the mandates whose expiry may still be
due) up, down and up again, on SQLite and PostgreSQL; the final schema is exactly ``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

INDEX = "ix_mandates_expiry_due"


async def _indexes(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: {str(i["name"]) for i in inspect(sync).get_indexes("mandates")}
        )


async def test_0013_mandate_expiry_due_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, "0012_brin_time_indexes")
    assert INDEX not in await _indexes(empty_db)

    await upgrade(empty_db, "0013_mandate_expiry_due")
    assert INDEX in await _indexes(empty_db)
    assert await _current(empty_db) == "0013_mandate_expiry_due"

    await _downgrade(empty_db, "0012_brin_time_indexes")
    assert INDEX not in await _indexes(empty_db)

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
