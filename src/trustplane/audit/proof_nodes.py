"""The tree nodes a proof needs: kept in memory (the upper levels, and the lower ones as far as a
budget allows), the rest read in one statement.

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
like the others). The levels below are kept too, as dense prefixes bounded by
``audit_proof_cache_mb`` (:class:`LowerLevels`; about 64 bytes per entry for all of them): once
they reach a tree size, a proof at that size reads nothing. :meth:`ProofNodes.load_upper` reads
the upper nodes in one statement (a range of ids:
``level << 48 | index`` puts every upper node above ``MIN_LEVEL << 48``) when a server starts;
nodes completed later enter as the sequencer commits them, or when a proof first reads them. The
right edge of a tree size (its perfect subtrees below ``MIN_LEVEL``, one per set bit) is in nearly
every proof at that size, so the edges of the sizes recently proved are kept too (at most
:data:`MAX_EDGE` nodes). The rest (at most ``MIN_LEVEL`` nodes per proof) are read in one statement, with
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
import time
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
#: Bytes of the lower levels' hashes kept by default (``audit_proof_cache_mb``: 128 MiB holds
#: every node of a tree of 2M entries).
CACHE_BYTES = 128 << 20
#: Nodes one statement of :meth:`ProofNodes.fill` reads (one ``bytea`` of 512 KiB on PostgreSQL;
#: on a SQLite file a quarter: its rows are read on the loop's thread, about 2 ms).
FILL_CHUNK = 16_384
_MASK = (1 << merkle.LEVEL_SHIFT) - 1

#: Seconds after a proof during which a sequencer whose batch did not follow the lower levels'
#: prefixes (another process integrated in between) fills them at once; past it, the next proof
#: that misses starts the fill (:meth:`ProofNodes.read`).
RECENT_PROOF_S = 60.0

_PG_NODES_SQL = store.nodes_sql("postgresql", 0)

_Waiter = tuple[list[int], asyncio.Future[dict[int, bytes]]]


class ProofNodes:
    """Tree nodes by id for proofs, and the tree size, each in one statement."""

    def __init__(
        self, db: Database, *, flights: int = FLIGHTS, cache_bytes: int = CACHE_BYTES
    ) -> None:
        self._db = db
        self._lower = LowerLevels(cache_bytes)
        self._filling: asyncio.Task[None] | None = None
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
        #: ``time.monotonic()`` of the last :meth:`read` (a proof); -inf: none yet
        self._proved_at = float("-inf")

    def cached(self, ids: Iterable[int]) -> tuple[dict[int, bytes], list[int]]:
        """The nodes among ``ids`` held in memory, and the ids still to read (sorted)."""
        found: dict[int, bytes] = {}
        missing = []
        cached, edge, upper, lower = self._cached, self._edge, self._min_id, self._lower.get
        for i in ids:
            # below MIN_LEVEL: the dense prefixes of the lower levels, else the edge kept
            h = cached.get(i) if i >= upper else lower(i) or edge.get(i)
            if h is None:
                missing.append(i)
            else:
                found[i] = h
        missing.sort()
        return found, missing

    def remember(self, nodes: Iterable[tuple[int, bytes]]) -> None:
        """Keep the upper nodes among ``nodes`` (committed), while there is room, and the lower
        ones that extend a level's prefix (:class:`LowerLevels`)."""
        room, upper = MAX_CACHED - len(self._cached), self._min_id
        extend = self._lower.extend_one
        for i, h in nodes:
            if i < upper:
                extend(i, h)
            elif room > 0 and i not in self._cached:
                self._cached[i] = h
                room -= 1

    async def remember_committed(self, runs: Sequence[tuple[int, int, bytes]], size: int) -> None:
        """Keep the nodes a batch of this process's sequencer committed (the tree is now at least
        ``size``), given per level (``merkle.TreeBuilder.runs``: level, first index, hashes): a
        lower level's run extends its prefix in one step if it follows it, the upper nodes are kept
        while there is room. If the lower levels' prefixes lag behind ``size`` and a proof was
        asked in the last :data:`RECENT_PROOF_S` seconds, start filling them."""
        lower = self._lower
        lower.grown(size)
        for level, first, blob in runs:
            if level < MIN_LEVEL:
                lower.extend(level, first, blob)  # refused if it would leave a gap
            else:  # few: one node per 2**MIN_LEVEL leaves
                self.remember(
                    (merkle.node_id(level, first + k), blob[32 * k : 32 * k + 32])
                    for k in range(len(blob) // 32)
                )
        # another process integrated before this batch: fill now if proofs are being asked, else
        # leave it to the next proof that misses (with two workers integrating in turn, an eager
        # fill ran after nearly every batch: about 3 % of a token's server + database CPU, for
        # proofs nobody asked)
        recent = time.monotonic() - self._proved_at < RECENT_PROOF_S
        if recent and self._lower.lagging(size):
            self._catch_up(size)

    async def fill(self, size: int) -> int:
        """Read into memory the lower levels' nodes of the tree of ``size`` (which exists) that
        are not there yet, each level's missing run in statements of :data:`FILL_CHUNK` nodes;
        returns how many were read. A level whose run comes back incomplete stays as it was."""
        running = self._filling
        if running is not None and running is not asyncio.current_task():
            await asyncio.wait([running])  # its end (not cancelled if this caller is)
        lower, read = self._lower, 0
        lower.grown(size)
        for level in range(lower.levels - 1, lower.floor - 1, -1):  # the smallest levels first
            want = size >> level
            while (have := lower.count(level)) < want:
                if level < lower.floor:  # the tree grew meanwhile: this level left the budget
                    break
                end = min(want, have + (FILL_CHUNK if self._pg else FILL_CHUNK // 4))
                blob = await self._run(merkle.node_id(level, have), merkle.node_id(level, end))
                if blob is None or not lower.extend(level, have, blob):
                    break
                read += end - have
        return read

    async def _run(self, start: int, end: int) -> bytes | None:
        """The hashes of the nodes with ids ``start`` to ``end`` - 1, concatenated in id order;
        None if any of them is missing."""
        count = end - start
        if self._pg:  # one bytea: no row to decode per node; SQLAlchemy's pool, not the proofs'
            sql = store.PG_NODE_RUN_SQL
            rows = await self._engine_rows(sql, (start, end))
            n, blob = (int(rows[0][0]), bytes(rows[0][1] or b"")) if rows else (0, b"")
        else:
            rows = await self._rows(store.nodes_run_sql(self._db.dialect), (start, end))
            n, blob = len(rows), b"".join(bytes(r[0]) for r in rows)
        return blob if n == count and len(blob) == 32 * count else None

    def fill_later(self, size: int) -> None:
        """:meth:`fill` up to ``size`` (which exists) in a task of its own (one at a time)."""
        self._catch_up(size)

    def _catch_up(self, size: int) -> None:
        """Start filling the lower levels up to ``size`` in a task of its own (one at a time), if
        a proof at that size missed a node they should hold."""
        if self._filling is None or self._filling.done():
            task = asyncio.get_running_loop().create_task(self._fill_quietly(size), name="fill")
            self._filling = task

    async def _fill_quietly(self, size: int) -> None:
        with contextlib.suppress(Exception):  # the proofs read from the database meanwhile
            await self.fill(size)

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
        nodes = await self.read({i for plan in plans for ids in plan for i in ids}, size)
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

    async def read(self, ids: Iterable[int], size: int = 0) -> dict[int, bytes]:
        """The nodes with ``ids`` that exist (a missing id is absent from the answer); ``size``:
        a tree size that exists, whose nodes these are (the lower levels are filled up to it in
        the background if some of them were not in memory)."""
        self._proved_at = time.monotonic()
        found, missing = self.cached(ids)
        if missing and size and self._lower.behind(missing):
            self._catch_up(size)
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


class LowerLevels:
    """The nodes of the levels below :data:`MIN_LEVEL`, each level a dense prefix: the hashes of
    its nodes ``0 .. k-1``, 32 bytes each, in one ``bytearray`` (no object per node). A prefix only
    grows by the node that follows it, so it never holds a gap, and since only nodes of complete
    subtrees exist (and never change) every byte of it holds for every later tree size.

    ``budget`` bounds the bytes kept: at a tree of ``n`` entries level ``L`` has ``n >> L`` nodes,
    and the levels kept are the highest ones whose nodes fit in it together (all of them, about
    ``64 n`` bytes, up to ``budget / 64`` entries). As the tree grows past that, the lowest level
    kept is let go (its nodes are read from the database again): :attr:`floor` only rises."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.levels = MIN_LEVEL
        #: The lowest level kept (``levels``: none, until a tree size is known).
        self.floor = MIN_LEVEL
        self._data = [bytearray() for _ in range(MIN_LEVEL)]
        self._size = 0

    def grown(self, size: int) -> None:
        """The tree has reached ``size``: the levels that no longer fit the budget are dropped."""
        if size <= self._size:
            return
        first, self._size = self._size == 0, size
        floor, total = self.levels, 0
        while floor > 0 and total + 32 * (size >> (floor - 1)) <= self.budget:
            floor -= 1
            total += 32 * (size >> floor)
        floor = floor if first else max(self.floor, floor)
        for level in range(min(floor, self.levels)):
            self._data[level] = bytearray()
        self.floor = floor

    def count(self, level: int) -> int:
        """How many nodes of ``level`` are kept (its prefix)."""
        return len(self._data[level]) // 32

    def get(self, i: int) -> bytes | None:
        """The hash of node id ``i`` (below ``MIN_LEVEL``) if kept."""
        data = self._data[i >> merkle.LEVEL_SHIFT]
        at = (i & _MASK) * 32
        return bytes(data[at : at + 32]) if at < len(data) else None

    def extend_one(self, i: int, h: bytes) -> None:
        """Keep node id ``i`` (below ``MIN_LEVEL``, committed) if it is the next of its level."""
        level = i >> merkle.LEVEL_SHIFT
        data = self._data[level]
        if level >= self.floor and len(data) == (i & _MASK) * 32 and len(h) == 32:
            data += h

    def extend(self, level: int, start: int, blob: bytes) -> bool:
        """Keep the committed nodes ``start ..`` of ``level`` (``blob``: their hashes in order)
        beyond the prefix; False if they would leave a gap or the level is not kept."""
        data = self._data[level]
        have = len(data) // 32
        if level < self.floor or start > have or len(blob) % 32:
            return False
        skip = (have - start) * 32
        if skip < len(blob):
            data += memoryview(blob)[skip:]
        return True

    def behind(self, ids: Iterable[int]) -> bool:
        """Whether any of ``ids`` is of a level kept (it was missed: the prefix is behind)."""
        floor, levels, shift = self.floor, self.levels, merkle.LEVEL_SHIFT
        return any(floor <= i >> shift < levels for i in ids)

    def lagging(self, size: int) -> bool:
        """Whether a level kept holds fewer nodes than the tree of ``size`` has."""
        return any(self.count(level) < size >> level for level in range(self.floor, self.levels))

    @property
    def bytes_kept(self) -> int:
        return sum(len(data) for data in self._data)


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
