"""The async engine for SQLite (embedded default) and PostgreSQL, and the unit of work.

Stores never commit: :meth:`Database.transaction` owns the transaction and hands stores a connection.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


#: How long a start-up check waits for the database before it gives up.
PROBE_TIMEOUT = 5.0

#: PostgreSQL connections older than this (seconds) are replaced at their next checkout, before a
#: server-side idle timeout or a NAT table forgets them (checkouts are not pre-pinged).
POOL_RECYCLE = 1800


class DatabaseUnavailable(Exception):
    """The database cannot be opened or reached; ``str(self)`` says why in one line, without
    credentials. The caller adds which setting to change."""


class DatabaseMissing(DatabaseUnavailable):
    """A SQLite file that was to be opened, not created, does not exist."""


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
            {"pool_size": pool_size, "max_overflow": pool_size}, sqlite_file_pool=False
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
            kwargs.update(pool, pool_recycle=POOL_RECYCLE)
        engine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            event.listen(engine.sync_engine, "checkout", _refuse_closed)
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

    async def probe(self) -> None:
        """Start-up check: connect once and run ``SELECT 1`` within :data:`PROBE_TIMEOUT` seconds, so an
        unreachable server is one :class:`DatabaseUnavailable` line, not a driver traceback after
        the driver's own (minute-long) connect timeout."""
        where, timeout = describe(self.url), PROBE_TIMEOUT
        try:
            async with asyncio.timeout(timeout):
                async with self.engine.connect() as conn:
                    await conn.exec_driver_sql("SELECT 1")
        except TimeoutError:
            raise DatabaseUnavailable(f"no answer from {where} within {timeout:g} s") from None
        except (OSError, SQLAlchemyError) as exc:
            raise DatabaseUnavailable(f"cannot connect to {where}: {_reason(exc)}") from None

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


def _refuse_closed(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """Checkout without a round trip (instead of ``pool_pre_ping``, which costs ``BEGIN``, ``;``,
    ``ROLLBACK`` per checkout on asyncpg): a connection the driver already knows is closed (the
    server terminated it: ``pg_terminate_backend``, a restart, a failover) is discarded and the pool
    hands out a fresh one (SQLAlchemy's ``DisconnectionError`` protocol, up to three attempts).
    A death not yet noticed surfaces as ``DBAPIError.connection_invalidated`` on the first
    statement, which callers on the hot path retry once (:func:`is_disconnect`)."""
    if connection_closed(dbapi_conn):
        raise DisconnectionError("the server closed this connection")


def connection_closed(dbapi_conn: Any) -> bool:
    """True if the driver already knows the connection is closed (asyncpg: no round trip);
    always False on SQLite (an in-process file does not disconnect)."""
    is_closed = getattr(getattr(dbapi_conn, "driver_connection", None), "is_closed", None)
    return bool(is_closed()) if callable(is_closed) else False


def is_disconnect(exc: BaseException) -> bool:
    """A statement failed because its connection was dead (SQLAlchemy invalidated it)."""
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


#: Every connection to a SQLite file: WAL for concurrent readers; FULL sync so that a commit is
#: durable before anyone is answered.
SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=30000")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    for pragma in SQLITE_PRAGMAS:
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def describe(url: str) -> str:
    """Where a database is, for messages: ``PostgreSQL at host:port/name`` or the SQLite file;
    never the user name or password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        return f"SQLite file {path.absolute()}" if path else "in-memory SQLite"
    port = f":{parsed.port}" if parsed.port else ""
    return f"PostgreSQL at {parsed.host or 'localhost'}{port}/{parsed.database or ''}"


def sqlite_path(url: str) -> Path | None:
    """The file of a file-backed SQLite URL; ``None`` for PostgreSQL and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def check_sqlite_file(path: Path, *, create: bool) -> None:
    """Refuse, before SQLite or ``mkdir`` fail with a traceback, a file that cannot be used.

    ``create=False`` (every command but ``migrate`` and ``serve``): the file must exist; nothing is
    created. ``create=True``: the file, or the nearest existing directory above it, must be
    writable. Either way every existing ancestor must be a directory.
    """
    path = path.absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing == path:
        if not path.is_file():
            raise DatabaseUnavailable(f"{path} is not a file")
        if create and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)):
            raise DatabaseUnavailable(f"{path} (or its directory) is read-only")
        return
    if not existing.is_dir():
        raise DatabaseUnavailable(f"{existing} is a file, not a directory")
    if not create:
        raise DatabaseMissing(f"there is no database at {path}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DatabaseUnavailable(f"directory {existing} is read-only")


def _reason(exc: BaseException) -> str:
    """The driver's own words, first line only (SQLAlchemy appends a background link)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return (text.strip().splitlines() or [type(cause).__name__])[0]
