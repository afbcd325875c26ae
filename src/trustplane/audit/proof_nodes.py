"""The tree nodes a proof needs, read in one statement, and the upper nodes kept in memory.

A node is the hash of a perfect subtree (:mod:`trustplane.audit.merkle`): it is written once, by the
integration that completes its subtree, and never changed (``audit_tree`` is append-only: triggers
refuse UPDATE and DELETE). So a node read once holds for every later proof at every later tree
size: the tree grows by adding nodes, never by changing one, and the memory has nothing to
invalidate, in this process or across workers. Only nodes read from committed rows (or committed by
this process's sequencer) enter it.

A proof at size ``n`` needs about ``log2 n`` nodes, one per level; the upper levels are shared by
every proof (there are few of them), the lower ones are nearly all different. So the nodes from
:data:`MIN_LEVEL` up are kept: about ``2n / 2**MIN_LEVEL`` of them (7,800 per million entries, about
1 MB), at most :data:`MAX_CACHED` (about 34 MB; past 33M entries the lowest kept levels are read
like the others). :meth:`ProofNodes.load_upper` reads them all in one statement (a range of ids:
``level << 48 | index`` puts every upper node above ``MIN_LEVEL << 48``) when a server starts;
nodes completed later enter as the sequencer commits them, or when a proof first reads them. The
right edge of a tree size (its perfect subtrees below ``MIN_LEVEL``, one per set bit) is in nearly
every proof at that size, so the edges of the sizes recently proved are kept too (at most
:data:`MAX_EDGE` nodes). The rest (``MIN_LEVEL`` nodes per proof) are read in one statement, with
no transaction around it (a single statement needs none, and nodes do not change).

On a SQLite file that statement runs on the calling thread, one per proof: a primary-key lookup of
a few rows costs less than the hops to aiosqlite's thread and back, and it never yields to the event
loop, so concurrent proofs do not wait for each other.

On PostgreSQL each statement is a round trip, and it runs on a driver connection the proofs hold
(:class:`~trustplane.audit.held_connections.HeldConnections`): a checkout from SQLAlchemy's pool
and its return around each statement cost this process more CPU than the statement (a lone proof
spent 0.39-0.80 ms of CPU before, 0.16-0.31 ms now). A proof that finds a flight free and nobody waiting sends its
own statement from its caller's task (no task or future to make); the proofs asked while
``flights`` statements are in flight wait and then share the next one (one ``= ANY($1)`` over all
their ids), sent by a task of its own so that a proof abandoned by its caller does not abandon the
others.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from trustplane.audit import merkle, store
from trustplane.audit.held_connections import HeldConnections
from trustplane.storage.db import Database, is_disconnect

#: Nodes of this level and above are kept (a subtree of 256 leaves or more).
MIN_LEVEL = 8
#: At most this many nodes are kept (about 130 bytes each in a dict): once full, no more are added.
MAX_CACHED = 1 << 18
#: At most this many right-edge nodes below MIN_LEVEL are kept (emptied when full: the sizes
#: proved move on with every integration).
MAX_EDGE = 1024
#: PostgreSQL: proof statements in flight at once (each on one pooled connection) by default.
FLIGHTS = 2

_PG_NODES_SQL = store.nodes_sql("postgresql", 0)

_Waiter = tuple[list[int], asyncio.Future[dict[int, bytes]]]


class ProofNodes:
    """Tree nodes by id for proofs, and the tree size, each in one statement."""

    def __init__(self, db: Database, *, flights: int = FLIGHTS) -> None:
        self._db = db
        self._flights = flights
        self._flying = 0
        #: PostgreSQL: the ids each waiting proof needs, for the next statement
        self._waiting: list[_Waiter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._cached: dict[int, bytes] = {}
        self._edge: dict[int, bytes] = {}
        self._edge_size, self._edge_ids = 0, tuple[int, ...]()
        self._min_id = merkle.node_id(MIN_LEVEL, 0)  # the ids of levels >= MIN_LEVEL are above it
        self._pg = db.dialect == "postgresql"
        self._held = HeldConnections(db, flights) if self._pg else None
        #: SQLite file: the connection for reads on the calling thread, opened at the first read
        #: (when the file exists): None on PostgreSQL and in-memory SQLite.
        self._inline: sqlite3.Connection | None = None
        self._inline_opened = not db.is_sqlite

    def cached(self, ids: Iterable[int]) -> tuple[dict[int, bytes], list[int]]:
        """The nodes among ``ids`` held in memory, and the ids still to read (sorted)."""
        found: dict[int, bytes] = {}
        missing = []
        cached, edge, upper = self._cached, self._edge, self._min_id
        for i in ids:
            h = (cached if i >= upper else edge).get(i)  # the edge kept is below MIN_LEVEL only
            if h is None:
                missing.append(i)
            else:
                found[i] = h
        missing.sort()
        return found, missing

    def remember(self, nodes: Iterable[tuple[int, bytes]]) -> None:
        """Keep the upper nodes among ``nodes`` (committed), while there is room."""
        room, upper = MAX_CACHED - len(self._cached), self._min_id
        for i, h in [node for node in nodes if node[0] >= upper]:  # 1 in 128: skip the rest fast
            if room > 0 and i not in self._cached:
                self._cached[i] = h
                room -= 1

    async def load_upper(self) -> int:
        """Read every node of level :data:`MIN_LEVEL` and above (the highest first, at most
        :data:`MAX_CACHED`) in one statement; returns how many are kept."""
        sql = store.upper_nodes_sql(self._db.dialect)
        args = (self._min_id, MAX_CACHED)
        rows = await (self._driver_rows(sql, *args) if self._pg else self._rows(sql, args))
        self.remember((int(i), bytes(h)) for i, h in rows)
        return len(self._cached)

    async def range_hashes(self, ranges: Sequence[merkle.Range], size: int) -> list[bytes]:
        """The hash of each range of a proof at tree ``size`` (KeyError if a node it needs does not
        exist)."""
        plan = [
            [merkle.node_id(level, i) for level, i in merkle.perfect_nodes(a, b)] for a, b in ranges
        ]
        return await self.proof(plan, size)

    async def proof(self, plan: Sequence[Sequence[int]], size: int) -> list[bytes]:
        """The hashes of a proof at tree ``size`` given, for each, the ids of the nodes it folds
        (:func:`merkle.inclusion_nodes`): KeyError if a node does not exist."""
        return (await self.proofs([plan], size))[0]

    async def proofs(
        self, plans: Sequence[Sequence[Sequence[int]]], size: int
    ) -> list[list[bytes]]:
        """Several proofs at tree ``size`` (:meth:`proof`), their nodes read together."""
        nodes = await self.read({i for plan in plans for ids in plan for i in ids})
        self._keep_edge(size, nodes)
        fold = merkle.fold
        return [
            [nodes[ids[0]] if len(ids) == 1 else fold([nodes[i] for i in ids]) for ids in plan]
            for plan in plans
        ]

    def _keep_edge(self, size: int, nodes: dict[int, bytes]) -> None:
        """Keep the right-edge nodes below MIN_LEVEL of ``size`` among ``nodes``."""
        if size != self._edge_size:
            low = (i for i in merkle.frontier_ids(size) if i < self._min_id)
            self._edge_size, self._edge_ids = size, tuple(low)
        for i in self._edge_ids:
            h = nodes.get(i)
            if h is not None and i not in self._edge:
                if len(self._edge) >= MAX_EDGE:
                    self._edge.clear()
                self._edge[i] = h

    async def read(self, ids: Iterable[int]) -> dict[int, bytes]:
        """The nodes with ``ids`` that exist (a missing id is absent from the answer)."""
        found, missing = self.cached(ids)
        if missing and self._pg:
            alone = self._flying < self._flights and not self._waiting
            nodes = await (self._alone(missing) if alone else self._shared(missing))
            found.update((i, nodes[i]) for i in missing if i in nodes)
        elif missing:
            rows = await self._rows(store.nodes_sql(self._db.dialect, len(missing)), tuple(missing))
            read = {int(i): bytes(h) for i, h in rows}
            self.remember(read.items())
            found.update(read)
        return found

    async def _alone(self, ids: list[int]) -> dict[int, bytes]:
        """PostgreSQL, a statement free to fly: this proof's own, on the caller's task (no task
        or future to make). Proofs that ask meanwhile share the next statement."""
        self._flying += 1
        try:
            nodes: dict[int, bytes] = dict(await self._driver_rows(_PG_NODES_SQL, ids))
        finally:
            self._flying -= 1
            if self._waiting:
                self._launch()
        self.remember(nodes.items())
        return nodes

    def _launch(self) -> None:
        """A statement for the proofs waiting (its own task), if one may fly."""
        if self._flying < self._flights:
            self._flying += 1
            task = asyncio.get_running_loop().create_task(self._fly(), name="proof-nodes")
            self._tasks.add(task)  # a reference until it ends (the loop keeps only a weak one)
            task.add_done_callback(self._tasks.discard)

    async def _shared(self, ids: list[int]) -> dict[int, bytes]:
        """PostgreSQL: the nodes read by the next statement, which every proof waiting for one
        shares (the answer holds theirs too)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[int, bytes]] = loop.create_future()
        self._waiting.append((ids, future))
        self._launch()
        return await future

    async def _fly(self) -> None:
        """Statements until no proof waits: each reads what every proof waiting then needs. Its
        own task, so that a proof abandoned by its caller does not abandon the others."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                ids = sorted({i for wanted, _ in batch for i in wanted})
                try:
                    rows = await self._driver_rows(_PG_NODES_SQL, ids)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException:  # cancelled (the loop is closing): nobody answers them
                    for _, future in batch:
                        future.cancel()
                    raise
                nodes: dict[int, bytes] = dict(rows)
                self.remember(nodes.items())
                for _, future in batch:
                    if not future.done():
                        future.set_result(nodes)
        finally:
            self._flying -= 1
            if not self._flying:  # only after a cancellation: nobody is left to serve them
                for _, future in self._waiting:
                    future.cancel()
                self._waiting = []

    async def tree_size(self) -> int:
        """The current tree size (0 before the first integration)."""
        sql = store.TREE_SIZE_SQL
        rows = await (self._driver_rows(sql) if self._pg else self._rows(sql, ()))
        return int(rows[0][0]) if rows else 0

    async def _driver_rows(self, sql: str, *args: Any) -> Sequence[Any]:
        """PostgreSQL: one statement on a held driver connection
        (:class:`~trustplane.audit.held_connections.HeldConnections`). If it fails, it runs once
        more through SQLAlchemy's pool, so a failure that repeats reaches the caller as
        SQLAlchemy's error: a lost or exhausted database is answered 503, not 500."""
        if self._held is not None:
            with contextlib.suppress(Exception):  # else once more, through SQLAlchemy
                return await self._held.fetch(sql, *args)
        return await self._engine_rows(sql, args)

    async def _engine_rows(self, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        for attempt in (1, 2):
            async with self._db.autocommit_engine.connect() as conn:
                try:
                    rows: Sequence[Any] = (await conn.exec_driver_sql(sql, params)).all()
                    return rows
                except Exception as exc:  # a pooled connection found dead: once more
                    if attempt == 2 or not is_disconnect(exc):
                        raise
        raise AssertionError("unreachable")

    async def _rows(self, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        if not self._inline_opened:
            self._inline, self._inline_opened = _inline_reader(self._db), True
        if self._inline is not None:
            try:
                return self._inline.execute(sql, params).fetchall()
            except sqlite3.OperationalError:  # it would wait for a lock: take the thread instead
                pass
        return await self._engine_rows(sql, params)


def _inline_reader(db: Database) -> sqlite3.Connection | None:
    """A read-only connection to an existing SQLite file, never waiting for a lock, closed with
    ``db``."""
    path = make_url(db.url).database
    if not path or path == ":memory:" or not Path(path).is_file():
        return None
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("PRAGMA busy_timeout = 0")
    reader.execute("PRAGMA query_only = 1")
    weakref.finalize(db, reader.close)
    return reader
