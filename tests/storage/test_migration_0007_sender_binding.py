"""Migration ``0007_sender_binding`` (``authorization_codes.dpop_jkt``, RFC 9449 §10) up, down and
up again, on SQLite and PostgreSQL, with a code stored before it kept; the final schema is exactly
``metadata``."""

from __future__ import annotations

from sqlalchemy import text

from tests.storage.test_migration_0005_par import _downgrade
from tests.storage.test_migrations import _current, _diffs, empty_db  # noqa: F401
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade


async def _columns(db: Database) -> set[str]:
    async with db.engine.connect() as conn:

        def names(sync: object) -> set[str]:
            from sqlalchemy import inspect

            return {c["name"] for c in inspect(sync).get_columns("authorization_codes")}

        return await conn.run_sync(names)


async def test_0007_sender_binding_up_down_up(empty_db: Database) -> None:  # noqa: F811
    await upgrade(empty_db, "0006_ssf")
    assert "dpop_jkt" not in await _columns(empty_db)
    async with empty_db.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO authorization_codes (code_hash, client_id, user_id, user_lei, "
                "mandate_id, mandate_version, resource, scopes, authorization_details, "
                "redirect_uri, redirect_uri_given, expires_at) VALUES ('h1', 'c', 'u', 'l', 'm', "
                "1, 'https://r.example', 'a', '[]', 'https://c.example/cb', false, 1)"
            )
        )

    await upgrade(empty_db, "0007_sender_binding")
    assert "dpop_jkt" in await _columns(empty_db)
    assert await _current(empty_db) == "0007_sender_binding"
    async with empty_db.engine.connect() as conn:
        kept = (await conn.execute(text("SELECT dpop_jkt FROM authorization_codes"))).all()
    assert kept == [(None,)]  # an existing code stays unbound

    await _downgrade(empty_db, "0006_ssf")
    assert "dpop_jkt" not in await _columns(empty_db)

    await upgrade(empty_db)
    assert await _diffs(empty_db) == []
