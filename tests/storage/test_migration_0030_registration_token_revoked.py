"""Migration ``0030_registration_token_revoked`` up, down and up again, on SQLite and PostgreSQL:
the upgrade leaves every token as it was (not revoked); the downgrade, which drops ``revoked_at``,
ends a revoked token that had not expired (so that it stays unusable), and the final schema is
exactly ``metadata``."""

from __future__ import annotations

from sqlalchemy import inspect, text

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

BEFORE, AFTER = "0028_audit_pending_leaf_columns", "0030_registration_token_revoked"
LEI = "5493001KJTIIGC8Y1R12"
FAR = 4_000_000_000


async def _columns(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: {
                str(c["name"]) for c in inspect(sync).get_columns("initial_access_tokens")
            }
        )


async def _rows(db: Database, columns: str) -> list[tuple[object, ...]]:
    async with db.read() as conn:
        found = await conn.execute(
            text(f"SELECT {columns} FROM initial_access_tokens ORDER BY token_hash")  # noqa: S608 (the test's own column list)
        )
        return [tuple(r) for r in found]


async def test_0030_registration_token_revoked_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, BEFORE)
    assert "revoked_at" not in await _columns(empty_db)
    async with empty_db.transaction() as conn:
        for token_hash in ("kept", "revoked"):
            await conn.execute(
                text(
                    "INSERT INTO initial_access_tokens (token_hash, description, created_at, "
                    "expires_at, uses, lei) VALUES (:h, 'before', 0, :far, 0, :lei)"
                ),
                {"h": token_hash, "far": FAR, "lei": LEI},
            )

    await upgrade(empty_db, AFTER)
    assert await _current(empty_db) == AFTER
    assert await _rows(empty_db, "token_hash, revoked_at") == [("kept", None), ("revoked", None)]
    async with empty_db.transaction() as conn:
        await conn.execute(
            text("UPDATE initial_access_tokens SET revoked_at = 1000 WHERE token_hash = 'revoked'")
        )

    await _downgrade(empty_db, BEFORE)
    assert "revoked_at" not in await _columns(empty_db)
    assert await _current(empty_db) == BEFORE
    assert await _rows(empty_db, "token_hash, expires_at") == [("kept", FAR), ("revoked", 1000)]

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
