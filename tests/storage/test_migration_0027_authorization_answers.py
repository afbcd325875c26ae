"""Migration ``0027_authorization_answers`` (the ids of answered authorization requests: the consent
form is single-use) up, down and up again, on SQLite and PostgreSQL; the final schema is exactly
``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect, text

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

BEFORE, AFTER = "0025_registration_token_any_lei", "0027_authorization_answers"


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))


async def test_0027_authorization_answers_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, BEFORE)
    assert "authorization_answers" not in await _tables(empty_db)

    await upgrade(empty_db, AFTER)
    assert await _current(empty_db) == AFTER
    async with empty_db.transaction() as conn:
        await conn.execute(
            text("INSERT INTO authorization_answers (request_id, expires_at) VALUES ('r', 1)")
        )
    async with empty_db.read() as conn:
        rows = (
            await conn.execute(text("SELECT request_id, expires_at FROM authorization_answers"))
        ).all()
    assert [tuple(r) for r in rows] == [("r", 1)]

    await _downgrade(empty_db, BEFORE)
    assert "authorization_answers" not in await _tables(empty_db)
    assert await _current(empty_db) == BEFORE

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
