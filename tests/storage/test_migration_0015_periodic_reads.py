"""Migration ``0015_periodic_reads`` (the windows by signal and bucket; the SETs not yet published,
by seq, in place of the full ``published_at`` index) up, down and up again, on SQLite and
PostgreSQL; the final schema is exactly ``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

BEFORE = {"ix_security_events_published_at"}
AFTER = {"ix_surveillance_windows_signal_bucket", "ix_security_events_unpublished"}


async def _indexes(db: Database) -> set[str]:
    def names(sync: object) -> set[str]:
        found = inspect(sync)
        return {
            str(i["name"])
            for table in ("surveillance_windows", "security_events")
            for i in found.get_indexes(table)
        }

    async with db.engine.connect() as conn:
        return (await conn.run_sync(names)) & (BEFORE | AFTER)


async def test_0015_periodic_reads_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, "0014_audit_purge_marks")
    assert await _indexes(empty_db) == BEFORE

    await upgrade(empty_db, "0015_periodic_reads")
    assert await _indexes(empty_db) == AFTER
    assert await _current(empty_db) == "0015_periodic_reads"

    await _downgrade(empty_db, "0014_audit_purge_marks")
    assert await _indexes(empty_db) == BEFORE

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
