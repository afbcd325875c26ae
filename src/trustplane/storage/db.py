"""The async engine for SQLite (embedded default) and PostgreSQL, and the unit of work.

Stores never commit: :meth:`Database.transaction` owns the transaction and hands stores a connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


def async_url(url: str) -> str:
    """Accept plain ``sqlite:///`` / ``postgresql://`` URLs and pick the async driver."""
    parsed = make_url(url)
    driver = _DRIVERS.get(parsed.drivername, parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


class Database:
    """An engine plus the dialect facts the stores need."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = async_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        self._pool_size = pool_size
        self._autocommit: AsyncEngine | None = None
        self.engine: AsyncEngine = self._create_engine(
            {"pool_size": pool_size, "max_overflow": pool_size, "pool_pre_ping": True},
            sqlite_file_pool=False,
        )

    def _create_engine(
        self, pool: dict[str, Any], *, sqlite_file_pool: bool, **options: Any
    ) -> AsyncEngine:
        """``pool``: QueuePool options for PostgreSQL, and for a SQLite file if ``sqlite_file_pool``
        (otherwise SQLAlchemy's defaults)."""
        kwargs: dict[str, Any] = dict(options)
        if self.is_sqlite:
            path = make_url(self.url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            if path in (None, "", ":memory:"):
                kwargs["poolclass"] = NullPool
            elif sqlite_file_pool:
                kwargs.update(pool)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool)
        engine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine

    @property
    def autocommit_engine(self) -> AsyncEngine:
        """A second engine (its own pool, made on first use) for callers whose every unit of work
        is one statement: each statement commits on its own, with no ``BEGIN``/``COMMIT`` round
        trips and no rollback when a connection goes back to the pool, and PostgreSQL checkouts
        are not pre-pinged (on asyncpg a ping outside a transaction is three round trips:
        ``BEGIN``, ``;``, ``ROLLBACK``). Such a caller must retry a statement once when its
        connection turns out to be dead (SQLAlchemy's ``DBAPIError.connection_invalidated``).
        The pool does not overflow: a burst waits for one of ``pool_size`` connections rather
        than opening and closing extra ones (a thread each on SQLite)."""
        if self._autocommit is None:
            self._autocommit = self._create_engine(
                {"pool_size": self._pool_size, "max_overflow": 0},
                sqlite_file_pool=True,
                isolation_level="AUTOCOMMIT",
                skip_autocommit_rollback=True,
            )
        return self._autocommit

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One unit of work: commits on success, rolls back on any exception."""
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._autocommit is not None:
            await self._autocommit.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL for concurrent readers; FULL sync so that a commit is durable before we answer."""
    cursor = dbapi_conn.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=FULL",
        "foreign_keys=ON",
        "busy_timeout=30000",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()
