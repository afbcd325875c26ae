"""Group commit: many concurrent requests' durable writes share one transaction.

The token endpoint must make two things durable before it answers: the client assertion's ``jti`` is
consumed, and the issuance is in the audit trail. Committing once per request caps throughput at the
database's commit rate (an fsync each on SQLite). Instead each request submits its write and awaits a
future; one task drains everything queued, runs it in a single transaction grouped by kind (one
multi-row statement per kind), commits, and only then resolves the futures. Nobody is answered before
their write is durable. If a batch's transaction fails, its items are retried one by one, so a single
poison item (a value the database refuses) fails alone instead of failing unrelated requests; an item
whose own transaction fails is told ``WriterUnavailable`` (fail closed) and nothing of it is committed.

The writer holds one connection. One the server closed (``pg_terminate_backend``, a restart) is
replaced before the batch if the driver already knows (no round trip), and a batch whose statements
fail because the connection was dead runs once more on a fresh one; a failure of the ``COMMIT``
itself is never retried as a whole (whether it committed is unknown).

On PostgreSQL the writer's connection comes from the autocommit engine and the writer opens and
commits each batch's transaction on the driver connection itself (asyncpg's ``BEGIN``/``COMMIT``):
SQLAlchemy's own transaction adds nothing a batch needs, and with it out of the way a handler may run
its statement straight on the driver (:func:`~trustplane.storage.driver_sql.in_transaction`),
without SQLAlchemy's execution layers. Handlers written against SQLAlchemy run unchanged, inside the
same transaction. A connection whose batch failed is invalidated (closed, never back in the pool
with a transaction open).

A kind may also have a single-statement handler (``register(..., alone=...)``), run on PostgreSQL
when a batch holds that kind only, on the autocommit connection with no transaction open: it
writes the whole batch in one statement, which commits on its own (one round trip instead of
``BEGIN``, the statements and ``COMMIT``), or writes nothing and returns None, and the batch then
runs in a transaction as any other. A dead connection found by that statement is treated as one
found before a ``COMMIT``: the batch runs once more on a fresh connection. If the statement had
committed before the connection died, the retry finds its single-use rows taken and the handler
sends the batch the transactional way, which refuses those requests: nothing is granted twice.

On a SQLite file the batch's whole transaction runs in one call to the writer's own thread, on a
plain ``sqlite3`` connection (:mod:`trustplane.storage.sqlite_batch`): the turn, ``BEGIN
IMMEDIATE``, every handler, ``COMMIT``, then one wake-up of the event loop, instead of a trip to
aiosqlite's thread for every statement. The handlers are the same coroutines, registered with
``statements_only=True``; a batch with a kind not so registered (or whose handler turns out to wait
for something) runs through aiosqlite instead, as every batch does on an in-memory database.

Before it drains the queue the writer lets the event loop take up to :data:`GATHER_TURNS` turns
(a ``sleep(0)`` each), fewer once :data:`GATHER_ENOUGH` writes are queued: a request whose bytes
have arrived, or whose handler is ready to run, reaches its ``submit`` within a turn or two and
joins this commit instead of waiting for the next one. Under load that spreads a commit's fixed
cost (the statement's execution, the ``COMMIT`` and its WAL flush) over more requests: PostgreSQL,
two workers, 32 connections, 7-9 requests per commit without the turns, 15 with them. The turns
stop at 16 queued because a batch far larger only makes the requests wait together for one
commit while the process has nothing else to do (at 64 connections, three turns without that
limit gave batches of 30 and fewer tokens a second than one turn). An idle loop's turn takes a
few microseconds, so a lone request is not held back. PostgreSQL's ``commit_delay`` is the same
idea, in time instead of turns.

``trustplane_group_commit_batch_size`` counts the writes per commit; on the token endpoint each
request is one write, so it is the number of requests that share a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane import metrics
from trustplane.storage import sqlite_batch
from trustplane.storage.db import Database, connection_closed, is_disconnect, sqlite_path
from trustplane.storage.turn import WriterTurn

log = structlog.get_logger(__name__)

#: Event-loop turns the writer lets pass between its first queued write and draining the queue.
GATHER_TURNS = 3
#: Writes queued that end the turns early: a commit's fixed cost is spread thin enough over them.
GATHER_ENOUGH = 16

#: Writes one kind's payloads in one go; returns one result per payload, in order.
BatchHandler = Callable[[AsyncConnection, Sequence[Any]], Awaitable[Sequence[Any]]]
#: The same in one statement committed on its own, or nothing written and None.
AloneHandler = Callable[[AsyncConnection, Sequence[Any]], Awaitable[Sequence[Any] | None]]


class _Transaction(Protocol):
    async def commit(self) -> None: ...


class WriterUnavailable(Exception):
    """The batch could not be committed; nothing in it is durable."""


class RolledBack(Exception):
    """PostgreSQL answered the batch's ``COMMIT`` with ``ROLLBACK``: its transaction had failed
    (a statement error that a handler caught), so nothing of it is durable."""


class _DriverTransaction:
    """A batch's transaction opened with a plain ``BEGIN`` on the asyncpg connection: asyncpg's
    ``Transaction`` object adds only bookkeeping (~20-30 us of client CPU per batch), and unlike it
    this one reads ``COMMIT``'s answer: in a transaction that has failed, PostgreSQL answers
    ``COMMIT`` with the command tag ``ROLLBACK`` and no error, and the batch must not be reported
    as committed."""

    __slots__ = ("_driver",)

    def __init__(self, driver: Any) -> None:
        self._driver = driver

    async def commit(self) -> None:
        tag = await self._driver.execute("COMMIT")
        if tag != "COMMIT":
            raise RolledBack(f"COMMIT answered {tag!r}")


@dataclass(slots=True)
class _Item:
    kind: str
    payload: Any
    future: asyncio.Future[Any]


class GroupCommitWriter:
    """Single background task that commits queued writes in batches of up to ``max_batch``."""

    def __init__(self, db: Database, *, max_batch: int = 512) -> None:
        self._db = db
        self._handlers: dict[str, BatchHandler] = {}
        self._alone: dict[str, AloneHandler] = {}
        self._order: list[str] = []
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._max_batch = max_batch
        self._task: asyncio.Task[None] | None = None
        self._conn: AsyncConnection | None = None
        self._raw: Any = None  # the pool's proxy of the driver connection under ``_conn``
        self._stopping = False
        self._committing = False  # the failed batch had reached its COMMIT (not retried whole)
        self._turn = WriterTurn.for_database(db)  # SQLite: worker processes take turns (turn.py)
        #: SQLite file: the thread that runs whole batches, its connection, and the kinds that
        #: cannot run there (their handler waited for something: sqlite_batch.Suspended)
        self._file = sqlite_path(db.url)
        self._thread: ThreadPoolExecutor | None = None
        self._sqlite: sqlite3.Connection | None = None
        self._on_loop: set[str] = set()
        self.batches = 0
        self.items = 0

    def register(
        self,
        kind: str,
        handler: BatchHandler,
        *,
        statements_only: bool = False,
        alone: AloneHandler | None = None,
    ) -> None:
        """Kinds run in registration order inside a batch (replay rows before audit rows).

        ``statements_only``: the handler awaits nothing but statements on the connection it is
        given (and touches no event-loop object), so on a SQLite file it runs in the writer's thread
        (:mod:`~trustplane.storage.sqlite_batch`); a batch with any other kind in it runs on the
        loop, through aiosqlite.

        ``alone``: PostgreSQL, a batch of this kind only: tried first, on the autocommit connection
        outside any transaction; it must write the batch in one statement (its results, as the
        handler's) or write nothing and return None (the batch then goes to ``handler`` in a
        transaction)."""
        self._handlers[kind] = handler
        self._order.append(kind)
        if not statements_only:
            self._on_loop.add(kind)
        if alone is not None:
            self._alone[kind] = alone

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Refuse new writes, finish what is queued, then stop."""
        if self._task is None:
            return
        self._stopping = True
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self._stopping = False
        await self._drop_connection()
        await self._close_thread()
        if self._turn is not None:
            self._turn.close()

    async def submit(self, kind: str, payload: Any) -> Any:
        """Queue one write and wait until it is committed; returns the handler's result for it."""
        if self._task is None or self._stopping:
            raise WriterUnavailable("writer is not running")
        if kind not in self._handlers:
            raise KeyError(f"no handler registered for {kind!r}")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(kind, payload, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            for _ in range(GATHER_TURNS):  # the writes a turn or two away join this commit
                if self._queue.qsize() + 1 >= GATHER_ENOUGH:
                    break
                await asyncio.sleep(0)
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._flush(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _connection(self) -> AsyncConnection:
        """The writer keeps one connection: no pool checkout or reset round trip per batch."""
        if self._conn is not None and connection_closed(self._raw):
            await self._drop_connection()
        if self._conn is None:
            engine = self._db.engine if self._db.is_sqlite else self._db.autocommit_engine
            self._conn = await engine.connect()
            self._raw = await self._conn.get_raw_connection()
        return self._conn

    async def _begin(self, conn: AsyncConnection) -> _Transaction:
        """SQLite: SQLAlchemy's transaction. PostgreSQL: ``BEGIN`` sent on the driver connection
        of an autocommit connection (:class:`_DriverTransaction`)."""
        if self._db.is_sqlite:
            return await conn.begin()
        driver = self._raw.driver_connection
        await driver.execute("BEGIN")
        return _DriverTransaction(driver)

    async def _drop_connection(self, *, broken: bool = False) -> None:
        """After a failure the connection may be broken (or, on PostgreSQL, still in the failed
        batch's transaction): it is invalidated and the next batch opens a fresh one."""
        conn, self._conn, self._raw = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                if broken:
                    await conn.invalidate()
                await conn.close()

    def _my_turn(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._turn.hold() if self._turn is not None else contextlib.nullcontext()

    async def _in_thread(self, by_kind: dict[str, list[_Item]]) -> list[tuple[_Item, Any]]:
        """SQLite file: the whole transaction in one call to the writer's thread."""
        kinds = [kind for kind in self._order if kind in by_kind]
        steps = [(self._handlers[k], [i.payload for i in by_kind[k]]) for k in kinds]
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="group-commit")
        loop = asyncio.get_running_loop()
        try:
            outs = await loop.run_in_executor(self._thread, self._transact, steps)
        except sqlite_batch.Suspended as exc:  # rolled back: that kind runs on the loop from now on
            self._on_loop.add(kinds[exc.step])
            log.warning("group_commit_handler_waits", kind=kinds[exc.step], awaited=str(exc))
            return await self._on_the_loop(by_kind)
        return [
            pair
            for kind, out in zip(kinds, outs, strict=True)
            for pair in zip(by_kind[kind], out, strict=True)
        ]

    def _transact(self, steps: list[tuple[BatchHandler, list[Any]]]) -> list[Sequence[Any]]:
        """In the writer's thread: the workers' turn around ``sqlite_batch.transact``."""
        if self._sqlite is None:
            assert self._file is not None
            self._sqlite = sqlite_batch.connect(self._file)
        conn = sqlite_batch.SyncConnection(self._sqlite)
        if self._turn is None:
            return sqlite_batch.transact(self._sqlite, steps, conn)
        with self._turn.held():
            return sqlite_batch.transact(self._sqlite, steps, conn)

    async def _close_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            raw, self._sqlite = self._sqlite, None
            if raw is not None:
                await asyncio.get_running_loop().run_in_executor(thread, raw.close)
            thread.shutdown(wait=False)

    async def _on_the_loop(self, by_kind: dict[str, list[_Item]]) -> list[tuple[_Item, Any]]:
        """Through the pool's connection (aiosqlite or asyncpg), a statement at a time."""
        results: list[tuple[_Item, Any]] = []
        conn = await self._connection()
        if len(by_kind) == 1 and not self._db.is_sqlite:
            alone = await self._alone_batch(conn, by_kind)
            if alone is not None:
                return alone
        async with self._my_turn():  # SQLite: the workers' turn, around the transaction
            transaction = await self._begin(conn)
            for kind in self._order:
                items = by_kind.get(kind)
                if items:
                    out = await self._handlers[kind](conn, [i.payload for i in items])
                    results.extend(zip(items, out, strict=True))
            self._committing = True
            await transaction.commit()
        return results

    async def _alone_batch(
        self, conn: AsyncConnection, by_kind: dict[str, list[_Item]]
    ) -> list[tuple[_Item, Any]] | None:
        """The batch's one kind's single-statement handler, if it has one (PostgreSQL); None:
        nothing was written."""
        ((kind, items),) = by_kind.items()
        handler = self._alone.get(kind)
        if handler is None:
            return None
        out = await handler(conn, [i.payload for i in items])
        return None if out is None else list(zip(items, out, strict=True))

    async def _flush(self, batch: list[_Item], *, reconnected: bool = False) -> None:
        by_kind: dict[str, list[_Item]] = {}
        for item in batch:
            by_kind.setdefault(item.kind, []).append(item)
        self._committing = False
        try:
            if self._file is not None and not self._on_loop.intersection(by_kind):
                results = await self._in_thread(by_kind)
            else:
                results = await self._on_the_loop(by_kind)
        except Exception as exc:  # fail closed: nobody in the failed transaction is told "done"
            # a statement sent straight to the driver fails with the driver's own error: the
            # connection was dead if the driver now knows it is closed
            dead = is_disconnect(exc) or connection_closed(self._raw)
            await self._drop_connection(broken=True)
            if dead and not self._committing and not reconnected:
                # the connection was dead before anything was committed: same batch, fresh one
                log.warning("group_commit_reconnect", error=repr(exc), batch=len(batch))
                await self._flush(batch, reconnected=True)
                return
            log.error("group_commit_failed", error=repr(exc), batch=len(batch))
            if len(batch) > 1:  # isolate a poison item: retry one by one so only it fails
                for item in batch:
                    await self._flush([item], reconnected=True)
                return
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(WriterUnavailable(repr(exc)))
            return
        self.batches += 1
        self.items += len(batch)
        metrics.WRITER_BATCH.observe(len(batch))
        # Only now, after COMMIT returned, is anybody answered.
        for item, result in results:
            if not item.future.done():
                item.future.set_result(result)
