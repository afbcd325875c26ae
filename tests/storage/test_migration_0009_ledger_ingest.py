"""Migration ``0009_ledger_ingest`` (``audit_ingested``: the services' events recorded, by issuer and
``jti``) up, down and up again, on SQLite and PostgreSQL; the final schema is exactly ``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))


async def test_0009_ledger_ingest_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, "0008_as_events")
    assert "audit_ingested" not in await _tables(empty_db)

    await upgrade(empty_db, "0009_ledger_ingest")
    assert "audit_ingested" in await _tables(empty_db)
    assert await _current(empty_db) == "0009_ledger_ingest"

    await _downgrade(empty_db, "0008_as_events")
    assert "audit_ingested" not in await _tables(empty_db)

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
