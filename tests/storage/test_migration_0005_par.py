"""Migration ``0005_par`` (pushed authorization requests) up, down and up again, on SQLite and
PostgreSQL: the table and its index appear and go, and the final schema is exactly ``metadata``."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Connection

from tests.storage.test_migrations import _current, _diffs, _tables, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import alembic_config, upgrade

TABLE = "pushed_authorization_requests"


async def _downgrade(db: Database, revision: str) -> None:
    config = alembic_config(db.url)

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def test_0005_par_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, "0004_entities")
    assert TABLE not in await _tables(empty_db)

    await upgrade(empty_db, "0005_par")
    assert TABLE in await _tables(empty_db)
    assert await _current(empty_db) == "0005_par"

    await _downgrade(empty_db, "0004_entities")
    assert TABLE not in await _tables(empty_db)
    assert await _current(empty_db) == "0004_entities"

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
