"""Alembic migrations: an empty database reaches head, and the migrated schema is exactly ``metadata``."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import PG_ADMIN_URL, require_service
from trustplane.schema import metadata
from trustplane.storage.db import Database
from trustplane.storage.migrate import alembic_config, pending, upgrade


async def _admin(sql: str) -> None:
    engine = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text(sql))
    await engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A database with no tables at all (not the migrated ``db_url`` of the other tests)."""
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
        yield db
        await db.dispose()
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"tp_migrate_{secrets.token_hex(4)}"
    await _admin(f'CREATE DATABASE "{name}"')
    db = Database(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        yield db
    finally:
        await db.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _head() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


async def _current(db: Database) -> str | None:
    def current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with db.engine.connect() as conn:
        return await conn.run_sync(current)


async def _diffs(db: Database) -> list[Any]:
    def compare(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))

    async with db.engine.connect() as conn:
        return await conn.run_sync(compare)


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def test_upgrade_on_an_empty_database_reaches_head(empty_db: Database) -> None:
    assert await _tables(empty_db) == set()
    assert await pending(empty_db) is True
    assert await _current(empty_db) is None

    await upgrade(empty_db)

    assert await pending(empty_db) is False
    assert await _current(empty_db) == _head()
    assert await _tables(empty_db) == set(metadata.tables) | {"alembic_version"}


async def test_migrated_schema_matches_metadata(empty_db: Database) -> None:
    await upgrade(empty_db)

    assert await _diffs(empty_db) == []


async def test_upgrade_twice_is_a_no_op(empty_db: Database) -> None:
    await upgrade(empty_db)
    await upgrade(empty_db)

    assert await pending(empty_db) is False
    assert await _diffs(empty_db) == []


async def test_comparison_detects_a_missing_index(empty_db: Database) -> None:
    """Guards the guard: a schema that drifts from ``metadata`` is reported."""
    await upgrade(empty_db)
    async with empty_db.transaction() as conn:
        await conn.execute(text("DROP INDEX ix_signing_keys_state"))

    diffs = await _diffs(empty_db)

    assert [(d[0], d[1].name) for d in diffs] == [("add_index", "ix_signing_keys_state")]


async def test_processes_starting_together_migrate_once(empty_db: Database) -> None:
    """Servers started together on a fresh database: one migrates, the others wait and find
    nothing to do (without the lock, SQLite's DDL outside a transaction made the second one fail
    with 'table already exists')."""
    others = [Database(empty_db.url) for _ in range(3)]
    try:
        await asyncio.gather(upgrade(empty_db), *(upgrade(db) for db in others))
    finally:
        for db in others:
            await db.dispose()
    assert await pending(empty_db) is False
    assert await _current(empty_db) == _head()
