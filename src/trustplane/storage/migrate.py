"""Alembic, driven from code: ``trustplane migrate`` and first start call :func:`upgrade`.

The migration scripts live inside the package (``trustplane/migrations``) so that an installed wheel
can migrate its database without a source checkout.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, make_url

from trustplane.storage.db import Database


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("trustplane") / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


#: Any constant: the PostgreSQL advisory lock that serialises migrations across processes.
MIGRATION_LOCK = 0x7472_7573_7470_6C61  # "trustpla"


@contextlib.asynccontextmanager
async def _sqlite_file_lock(url: str) -> AsyncIterator[None]:
    """SQLite runs DDL outside a transaction, so two processes migrating one file at once (servers
    started together on a fresh data directory) would both create the same tables: serialise them
    with an exclusive lock on a file beside the database."""
    database = make_url(url).database
    if not database or database == ":memory:":
        yield
        return
    fd = await asyncio.to_thread(os.open, database + ".migrate.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


async def upgrade(db: Database, revision: str = "head") -> None:
    """Migrate to ``revision``. Safe when several processes start at once: one migrates, the others
    wait and then find nothing to do."""
    config = alembic_config(db.url)

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    lock = _sqlite_file_lock(db.url) if db.is_sqlite else contextlib.nullcontext()
    async with lock, db.engine.begin() as conn:
        if not db.is_sqlite:
            await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        await conn.run_sync(run)


async def pending(db: Database) -> bool:
    """True if the database is not at the newest revision."""
    head = ScriptDirectory.from_config(alembic_config(db.url)).get_current_head()

    def current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with db.engine.connect() as conn:
        return await conn.run_sync(current) != head
