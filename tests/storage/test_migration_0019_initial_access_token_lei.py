"""Migration ``0019_initial_access_token_lei`` (an initial access token may be bound to one legal
entity) up, down and up again, on SQLite and PostgreSQL; a token created before it stays unbound,
and the final schema is exactly ``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect, text

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

BEFORE, AFTER = "0015_periodic_reads", "0019_initial_access_token_lei"


async def _columns(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: {
                str(c["name"]) for c in inspect(sync).get_columns("initial_access_tokens")
            }
        )


async def test_0019_initial_access_token_lei_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, BEFORE)
    assert "lei" not in await _columns(empty_db)
    async with empty_db.transaction() as conn:
        await conn.execute(
            text(
                "INSERT INTO initial_access_tokens (token_hash, description, created_at, "
                "expires_at, uses) VALUES ('h', 'before', 0, 1, 0)"
            )
        )

    await upgrade(empty_db, AFTER)
    assert "lei" in await _columns(empty_db)
    assert await _current(empty_db) == AFTER
    async with empty_db.read() as conn:
        rows = (await conn.execute(text("SELECT token_hash, lei FROM initial_access_tokens"))).all()
    assert [tuple(r) for r in rows] == [("h", None)]

    await _downgrade(empty_db, BEFORE)
    assert "lei" not in await _columns(empty_db)
    assert await _current(empty_db) == BEFORE

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
