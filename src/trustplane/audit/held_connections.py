"""PostgreSQL driver connections held open for the ledger's one-statement reads (proofs).

A proof's statement is a primary-key lookup of a few rows; taking a connection from SQLAlchemy's
pool for it and giving it back cost this process more CPU than the statement itself (measured on
the 1M-entry log, the same fetch of 8 node ids interleaved in one process: 254-361 us of CPU per
statement inside an ``AsyncConnection`` checkout of the autocommit engine, 76-155 us on a
connection held open; in an earlier run a bare pool checkout, 334-343 us). So proofs keep asyncpg
connections of their own, opened at the first statement (the database URL as a DSN, as the cache
listener of :mod:`trustplane.storage.notify` does), outside both pools: PostgreSQL sees at most
``size`` more connections per process. Each runs one statement at a time, with no transaction
(a single read needs none); asyncpg prepares the statement once per connection.

A connection is dropped, and the next statement opens another, when: the driver knows it closed
(the server terminated it, a restart); a statement on it failed other than by the server refusing
the statement (a protocol state not to be trusted), or was cancelled mid-flight; it is older than
the pools' :data:`~trustplane.storage.db.POOL_RECYCLE`. The caller decides what a failure means
(the proof path retries once through SQLAlchemy, so that a lost database is SQLAlchemy's error).
They are terminated when the database's engine is disposed (:meth:`Database.dispose`, which every
process runs last when it stops), so nothing outlives it; a terminated connection tells the server
nothing it logs above ``DEBUG1``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url

from trustplane.storage.db import POOL_RECYCLE, Database

#: Seconds to wait for a new connection before the statement fails (and falls back).
CONNECT_TIMEOUT = 5.0


class HeldConnections:
    """At most ``size`` idle asyncpg connections, each lent to one statement at a time."""

    def __init__(self, db: Database, size: int) -> None:
        url = make_url(db.url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._size = size
        self._idle: list[asyncpg.Connection] = []
        #: every open connection, idle or lent, and when it was opened (time.monotonic())
        self._open: dict[asyncpg.Connection, float] = {}
        # the listener holds the connections, not this object: those of a ledger dropped unclosed
        # (tests make many) stay referenced, and are closed, until the engine is disposed
        terminate = functools.partial(_terminate, self._open)
        event.listen(db.engine.sync_engine, "engine_disposed", terminate)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """The rows of one statement, on a held connection (opened if none is idle)."""
        conn = await self._take()
        try:
            rows: list[Any] = await conn.fetch(sql, *args)
        except asyncpg.PostgresError:  # refused by the server: the connection itself is fine
            self._give(conn)
            raise
        except BaseException:  # lost, cancelled mid-statement, or a client-side failure
            self._drop(conn)
            raise
        self._give(conn)
        return rows

    @property
    def open_count(self) -> int:
        return len(self._open)

    async def _take(self) -> asyncpg.Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            self._drop(conn)
        conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
        self._open[conn] = time.monotonic()
        return conn

    def _give(self, conn: asyncpg.Connection) -> None:
        born = self._open.get(conn)
        young = born is not None and time.monotonic() - born < POOL_RECYCLE
        if young and not conn.is_closed() and len(self._idle) < self._size:
            self._idle.append(conn)
        else:
            self._drop(conn)

    def _drop(self, conn: asyncpg.Connection) -> None:
        self._open.pop(conn, None)
        conn.terminate()  # no round trip; the server only notes the end at DEBUG level


def _terminate(connections: dict[asyncpg.Connection, float], _engine: object) -> None:
    """Close every connection at once (no round trip, no await)."""
    for conn in list(connections):
        conn.terminate()
    connections.clear()
