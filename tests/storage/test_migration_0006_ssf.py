"""Migration ``0006_ssf`` (shared signals: streams, SET outbox, derivations) up, down and up again,
on SQLite and PostgreSQL: the tables appear and go, and the final schema is exactly ``metadata``."""

from __future__ import annotations

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, _tables, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

TABLES = {"ssf_streams", "ssf_outbox", "ssf_derivations"}


async def test_0006_ssf_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, "0005_par")
    assert not TABLES & set(await _tables(empty_db))

    await upgrade(empty_db, "0006_ssf")
    assert set(await _tables(empty_db)) >= TABLES
    assert await _current(empty_db) == "0006_ssf"

    await _downgrade(empty_db, "0005_par")
    assert not TABLES & set(await _tables(empty_db))
    assert await _current(empty_db) == "0005_par"

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
