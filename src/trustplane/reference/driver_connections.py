"""The asyncpg connections a store's one-statement calls run on (:mod:`trustplane.reference.store_pg`),
held open by the process between statements.

A call took the autocommit pool's connection (``raw_connection()``) and gave it back: the pool's
queue, its checkout event, the connection's proxy with its weakref finalizer and the checkin cost
the process about as much CPU as asyncpg's own work for the statement (a ``SELECT 1`` in process,
2026-12-06, uvloop, the machine shared: 126-150 us through the pool's checkout, 66-82 us on a
connection held; ~27 such statements per lifecycle in the services and the publisher). So the
store's statements take connections of their own, as the ledger's proofs do
(``audit/held_connections.py``): opened on first need (the database URL as a DSN), outside both
SQLAlchemy pools, each lent to one statement at a time (autocommit: asyncpg runs a statement
outside a transaction).

At most ``size`` are open per store and process; a statement that finds all of them lent goes
through the autocommit pool as before (bounded by the pool), so a burst waits for a connection
rather than opening more. A connection is dropped (terminated: no round trip), and the next
statement opens another, when the driver knows it closed (the server terminated it, a restart), a
statement on it failed other than by the server refusing the statement (a protocol state not to be
trusted), or was cancelled mid-flight, or it is older than the pools' ``POOL_RECYCLE``. A
connection that cannot be opened sends the statement through the pool (whose error the caller
then sees, as before). Every held connection is terminated when the database's engine is disposed
(:meth:`Database.dispose`, which every process runs last), so nothing outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url

from trustplane.storage.db import POOL_RECYCLE, Database

#: Connections held per store and process (the autocommit pool's size, ``Database``'s default).
HELD = 10
#: Seconds to wait for a new connection before the statement goes through the pool instead.
CONNECT_TIMEOUT = 5.0


class DriverConnections:
    """At most ``size`` asyncpg connections to one database, each lent to one statement at a time."""

    def __init__(self, db: Database, size: int = HELD) -> None:
        url = make_url(db.url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._size = size
        self._idle: list[asyncpg.Connection] = []
        #: every open connection, idle or lent: when it was opened (time.monotonic()) and its loop
        self._open: dict[asyncpg.Connection, tuple[float, asyncio.AbstractEventLoop]] = {}
        self._connecting = 0
        #: called with each connection opened (tests log what goes on the wire)
        self.opened: list[Callable[[asyncpg.Connection], None]] = []
        # the listener holds the connections, not this object, so that they are terminated with
        # the engine even when the store that used them was dropped first
        event.listen(db.engine.sync_engine, "engine_disposed", _Terminate(self._open, self._idle))

    @property
    def open_count(self) -> int:
        return len(self._open)

    async def take(self, *, fresh: bool = False) -> asyncpg.Connection | None:
        """An idle connection (``fresh``: a new one), or None when ``size`` are open already or
        none could be opened (the caller then takes the pool's)."""
        loop = asyncio.get_running_loop()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.is_closed() and self._open.get(conn, (0.0, None))[1] is loop:
                return conn
            self.drop(conn)
        if len(self._open) + self._connecting >= self._size:
            return None
        self._connecting += 1
        try:
            conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
        except Exception:  # the pool's path says what is wrong, as before
            return None
        finally:
            self._connecting -= 1
        self._open[conn] = (time.monotonic(), loop)
        for opened in self.opened:
            opened(conn)
        return conn

    def give(self, conn: asyncpg.Connection) -> None:
        """Back to the idle ones after a statement that ended normally (or that the server
        refused): kept if young and open, dropped otherwise."""
        born = self._open.get(conn)
        young = born is not None and time.monotonic() - born[0] < POOL_RECYCLE
        if young and not conn.is_closed() and len(self._idle) < self._size:
            self._idle.append(conn)
        else:
            self.drop(conn)

    def drop(self, conn: asyncpg.Connection) -> None:
        self._open.pop(conn, None)
        _terminate(conn)


class _Terminate:
    """The engine's ``engine_disposed`` listener: every connection terminated at once (no round
    trip, no await)."""

    def __init__(
        self,
        connections: dict[asyncpg.Connection, tuple[float, asyncio.AbstractEventLoop]],
        idle: list[asyncpg.Connection],
    ) -> None:
        self._connections, self._idle = connections, idle

    def __call__(self, _engine: object) -> None:
        for conn in list(self._connections):
            _terminate(conn)
        self._connections.clear()
        self._idle.clear()


def _terminate(conn: asyncpg.Connection) -> None:
    # RuntimeError: its event loop closed already, and the socket went with it
    with contextlib.suppress(RuntimeError):
        conn.terminate()


_HELD: weakref.WeakKeyDictionary[Database, DriverConnections] = weakref.WeakKeyDictionary()


def connections_of(db: Database) -> DriverConnections:
    """The held connections of ``db`` in this process (made on first use)."""
    held = _HELD.get(db)
    if held is None:
        held = _HELD[db] = DriverConnections(db, HELD)
    return held
