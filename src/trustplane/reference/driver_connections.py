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

At most ``size`` are open per store and process, the autocommit pool's own bound: a statement
that finds all of them lent waits for the first one given back (handed over in the order the
statements came), as a checkout waited for the pool's; after :data:`WAIT_TIMEOUT` it goes
through the pool. (A first version sent it to the pool at once: up to twice the pool's
connections per store and process, and the lifecycle bench at concurrency 16 met PostgreSQL's
``max_connections``.) A connection is dropped (terminated: no round trip), and the next
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
from collections import deque
from collections.abc import Callable

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url

from trustplane.storage.db import POOL_RECYCLE, Database

#: Connections held per store and process (the autocommit pool's size, ``Database``'s default).
HELD = 10
#: Seconds to wait for a new connection before the statement goes through the pool instead.
CONNECT_TIMEOUT = 5.0
#: Seconds a statement waits for a held connection while all are lent before it goes through the
#: pool instead (the pool's own wait, ``pool_timeout``, is 30 s).
WAIT_TIMEOUT = 30.0


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
        #: callers waiting for a connection while ``size`` are lent, the longest waiting first
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        #: called with each connection opened (tests log what goes on the wire)
        self.opened: list[Callable[[asyncpg.Connection], None]] = []
        # the listener holds the connections, not this object, so that they are terminated with
        # the engine even when the store that used them was dropped first
        event.listen(
            db.engine.sync_engine,
            "engine_disposed",
            _Terminate(self._open, self._idle, self._waiters),
        )

    @property
    def open_count(self) -> int:
        return len(self._open)

    async def take(self, *, fresh: bool = False) -> asyncpg.Connection | None:
        """An idle connection (``fresh``: not an idle one), or, while ``size`` are lent, the first
        one given back (or a slot freed); None when none could be opened or none came back within
        :data:`WAIT_TIMEOUT` (the caller then takes the pool's)."""
        loop = asyncio.get_running_loop()
        while True:
            while self._idle and not fresh:
                conn = self._idle.pop()
                if self._usable(conn, loop):
                    return conn
                self.drop(conn)
            if len(self._open) + self._connecting < self._size:
                return await self._connect(loop)
            try:
                handed = await self._wait(loop)
            except TimeoutError:
                return None
            if handed is not None:
                if self._usable(handed, loop):
                    return handed
                self.drop(handed)

    def give(self, conn: asyncpg.Connection) -> None:
        """Back after a statement that ended normally (or that the server refused): to the
        longest waiting caller, or to the idle ones; dropped if old or closed."""
        born = self._open.get(conn)
        young = born is not None and time.monotonic() - born[0] < POOL_RECYCLE
        if not young or conn.is_closed():
            self.drop(conn)
        elif not self._hand(conn):
            self._idle.append(conn)

    def drop(self, conn: asyncpg.Connection) -> None:
        if self._open.pop(conn, None) is not None:
            self._hand(None)  # a slot is free: a waiting caller opens one
        _terminate(conn)

    def _usable(self, conn: asyncpg.Connection, loop: asyncio.AbstractEventLoop) -> bool:
        return not conn.is_closed() and self._open.get(conn, (0.0, None))[1] is loop

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> asyncpg.Connection | None:
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

    async def _wait(self, loop: asyncio.AbstractEventLoop) -> asyncpg.Connection | None:
        """A connection handed over, or None: a slot freed. Raises TimeoutError after
        :data:`WAIT_TIMEOUT` seconds. What this caller was handed but cannot take (cancelled,
        timed out at that moment) is passed on."""
        waiter: asyncio.Future[asyncpg.Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        taken = False
        try:
            async with asyncio.timeout(WAIT_TIMEOUT):
                handed = await waiter
            taken = True
            return handed
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if not taken and waiter.done() and not waiter.cancelled():
                passed = waiter.result()
                if passed is None:
                    self._hand(None)
                else:
                    self.give(passed)

    def _hand(self, conn: asyncpg.Connection | None) -> bool:
        """``conn`` (None: a free slot) to the longest waiting caller still waiting; False if
        nobody waits."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False


class _Terminate:
    """The engine's ``engine_disposed`` listener: every connection terminated at once (no round
    trip, no await)."""

    def __init__(
        self,
        connections: dict[asyncpg.Connection, tuple[float, asyncio.AbstractEventLoop]],
        idle: list[asyncpg.Connection],
        waiters: deque[asyncio.Future[asyncpg.Connection | None]],
    ) -> None:
        self._connections, self._idle, self._waiters = connections, idle, waiters

    def __call__(self, _engine: object) -> None:
        for conn in list(self._connections):
            _terminate(conn)
        self._connections.clear()
        self._idle.clear()
        while self._waiters:  # every slot is free: let them all look again
            waiter = self._waiters.popleft()
            if not waiter.done():
                with contextlib.suppress(RuntimeError):  # a closed loop's future
                    waiter.set_result(None)


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
