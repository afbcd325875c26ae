"""The tree nodes a proof needs, read in one statement, and the upper nodes kept in memory.

A node is the hash of a perfect subtree (:mod:`trustplane.audit.merkle`): it is written once, by the
integration that completes its subtree, and never changed (``audit_tree`` is append-only: triggers
refuse UPDATE and DELETE). So a node read once holds for every later proof at every later tree
size: the tree grows by adding nodes, never by changing one, and the cache has nothing to
invalidate. Only nodes read from committed rows enter it.

A proof at size ``n`` needs about ``log2 n`` nodes, one per level; the upper levels are shared by
every proof (there are few of them), the lower ones are nearly all different. So nodes from
:data:`MIN_LEVEL` up are kept, at most :data:`MAX_CACHED` of them (emptied when full: a bound, not a
policy), and the rest are read: one statement per proof, on the autocommit engine (no ``BEGIN`` /
``ROLLBACK`` round trips; a single statement needs no transaction, and nodes do not change), and on
a SQLite file on the calling thread (a primary-key lookup of a few rows costs less than the hops to
aiosqlite's thread and back).
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from trustplane.audit import merkle, store
from trustplane.storage.db import Database, is_disconnect

#: Nodes of this level and above are kept (a subtree of 256 leaves or more).
MIN_LEVEL = 8
#: At most this many nodes are kept (a few MB).
MAX_CACHED = 1 << 16


class ProofNodes:
    """Tree nodes by id for proofs, and the tree size, each in one statement."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._cached: dict[int, bytes] = {}
        self._min_id = merkle.node_id(MIN_LEVEL, 0)  # the ids of levels >= MIN_LEVEL are above it
        self._pg = db.dialect == "postgresql"
        #: SQLite file: the connection for reads on the calling thread, opened at the first read
        #: (when the file exists): None on PostgreSQL and in-memory SQLite.
        self._inline: sqlite3.Connection | None = None
        self._inline_opened = not db.is_sqlite

    def cached(self, ids: Iterable[int]) -> tuple[dict[int, bytes], list[int]]:
        """The nodes among ``ids`` held in memory, and the ids still to read (sorted)."""
        found: dict[int, bytes] = {}
        missing = []
        for i in ids:
            h = self._cached.get(i)
            if h is None:
                missing.append(i)
            else:
                found[i] = h
        missing.sort()
        return found, missing

    def remember(self, nodes: dict[int, bytes]) -> None:
        """Keep the upper nodes among ``nodes`` (read from committed rows)."""
        if len(self._cached) >= MAX_CACHED:
            self._cached.clear()
        for i, h in nodes.items():
            if i >= self._min_id:
                self._cached[i] = h

    async def read(self, ids: Iterable[int]) -> dict[int, bytes]:
        """The nodes with ``ids`` that exist (a missing id is absent from the answer)."""
        found, missing = self.cached(ids)
        if missing:
            sql = store.nodes_sql(self._db.dialect, len(missing))
            rows = await self._rows(sql, (missing,) if self._pg else tuple(missing))
            read = {int(i): bytes(h) for i, h in rows}
            self.remember(read)
            found.update(read)
        return found

    async def tree_size(self) -> int:
        """The current tree size (0 before the first integration)."""
        rows = await self._rows(store.TREE_SIZE_SQL, ())
        return int(rows[0][0]) if rows else 0

    async def _rows(self, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        if not self._inline_opened:
            self._inline, self._inline_opened = _inline_reader(self._db), True
        if self._inline is not None:
            try:
                return self._inline.execute(sql, params).fetchall()
            except sqlite3.OperationalError:  # it would wait for a lock: take the thread instead
                pass
        for attempt in (1, 2):
            async with self._db.autocommit_engine.connect() as conn:
                try:
                    rows: Sequence[Any] = (await conn.exec_driver_sql(sql, params)).all()
                    return rows
                except Exception as exc:  # a pooled connection found dead: once more
                    if attempt == 2 or not is_disconnect(exc):
                        raise
        raise AssertionError("unreachable")


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
