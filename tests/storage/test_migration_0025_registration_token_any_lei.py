"""Migration ``0025_registration_token_any_lei`` (an unbound initial access token is the operator's
explicit choice) up, down and up again, on SQLite and PostgreSQL: a token created unbound by default
before it gets ``any_lei`` false (it registers nothing), a bound one is untouched, and the final
schema is exactly ``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect, text

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

BEFORE, AFTER = "0024_audit_quarantine", "0025_registration_token_any_lei"
LEI = "5493001KJTIIGC8Y1R12"


async def _columns(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: {
                str(c["name"]) for c in inspect(sync).get_columns("initial_access_tokens")
            }
        )


async def test_0025_registration_token_any_lei_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, BEFORE)
    assert "any_lei" not in await _columns(empty_db)
    async with empty_db.transaction() as conn:
        for token_hash, lei in (("unbound", None), ("bound", LEI)):
            await conn.execute(
                text(
                    "INSERT INTO initial_access_tokens (token_hash, description, created_at, "
                    "expires_at, uses, lei) VALUES (:h, 'before', 0, 1, 0, :lei)"
                ),
                {"h": token_hash, "lei": lei},
            )

    await upgrade(empty_db, AFTER)
    assert await _current(empty_db) == AFTER
    async with empty_db.read() as conn:
        rows = await conn.execute(
            text("SELECT token_hash, lei, any_lei FROM initial_access_tokens ORDER BY token_hash")
        )
        found = [(h, lei, bool(any_lei)) for h, lei, any_lei in rows]
    assert found == [("bound", LEI, False), ("unbound", None, False)]

    await _downgrade(empty_db, BEFORE)
    assert "any_lei" not in await _columns(empty_db)
    assert await _current(empty_db) == BEFORE

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
