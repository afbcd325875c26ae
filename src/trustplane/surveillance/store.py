"""The detector's state store: a Protocol (what the detector needs, semantics in the docstrings) and
its SQLAlchemy implementation. Stores never commit: every method runs in the caller's transaction,
which :meth:`SurveillanceStore.claim` makes the only detector round on the database until it ends."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from sqlalchemy import (
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    null,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.tables import audit_leaves
from trustplane.surveillance.signals import ISSUED, REFUSED
from trustplane.surveillance.tables import (
    surveillance_actor_pairs,
    surveillance_cursor,
    surveillance_delegation,
    surveillance_windows,
)

CURSOR = "ledger"
#: pg_try_advisory_xact_lock key of the detector: "tp-surv" as an integer.
DETECTOR_LOCK = int.from_bytes(b"tp-surv", "big")


class CursorMoved(RuntimeError):
    """The cursor is not where this round read it: another detector advanced it (the round's
    transaction is rolled back, so nothing it raised is kept)."""


@dataclass(slots=True)
class Delegation:
    """A client's exchanges so far and the deepest ``act`` chain among them; ``stored``: the row
    exists already."""

    exchanges: int = 0
    max_depth: int = 0
    stored: bool = False


@dataclass(slots=True)
class Window:
    """One fixed window of one key: ``count`` entries, the first at ``first_index``; the alert, if
    raised, at ``alerted_index``. ``stored``: the row exists already."""

    count: int
    first_index: int
    alerted_index: int | None = None
    stored: bool = False


#: (client_id, pair digest): one (subject, actor) pair of a client (:func:`pair_digest`).
Pair = tuple[str, str]


class SurveillanceStore(Protocol):
    """The detector reads what a batch needs in one statement per kind and writes it back the same
    way (a round costs a handful of statements whatever its size)."""

    async def claim(self, conn: AsyncConnection) -> int | None:
        """Make this transaction the one detector round (PostgreSQL: a transaction advisory lock,
        None when another process holds it; SQLite: the database write lock, waited for) and return
        the cursor: the index of the next ledger leaf to read (0 on a new database)."""
        ...

    async def advance(self, conn: AsyncConnection, old: int, new: int) -> None:
        """Move the cursor from ``old`` to ``new``; :class:`CursorMoved` if it is not at ``old``."""
        ...

    async def delegations(
        self, conn: AsyncConnection, client_ids: Collection[str]
    ) -> dict[str, Delegation]:
        """What is known of each client's exchanges (a client never seen is absent)."""
        ...

    async def known_pairs(self, conn: AsyncConnection, pairs: Collection[Pair]) -> set[Pair]:
        """Those of ``pairs`` already remembered."""
        ...

    async def add_pairs(self, conn: AsyncConnection, pairs: Sequence[tuple[Pair, int]]) -> None:
        """Remember each pair (each once in ``pairs``) with the leaf index that showed it first; a
        pair already remembered keeps its index."""
        ...

    async def windows(
        self, conn: AsyncConnection, signal: str, keys: Collection[str], first: int, last: int
    ) -> dict[tuple[str, int], Window]:
        """The stored windows of ``signal`` for ``keys`` with ``first <= bucket <= last``, by
        (key, bucket)."""
        ...

    async def save(
        self,
        conn: AsyncConnection,
        delegations: dict[str, Delegation],
        windows: dict[tuple[str, str, int], Window],
    ) -> None:
        """Write back the delegations (by client) and windows (by signal, key, bucket) a batch
        changed."""
        ...


def pair_digest(subject: str, actor: str) -> str:
    return hashlib.sha256(f"{len(subject)}:{subject}|{actor}".encode()).hexdigest()


def _insert(dialect: str) -> Any:
    return pg_insert if dialect == "postgresql" else sqlite_insert


_KNOWN_PG = text(
    "SELECT t.client_id, t.pair FROM surveillance_actor_pairs AS t"
    " JOIN unnest(CAST(:c AS text[]), CAST(:p AS text[])) AS q(c, p)"
    " ON t.client_id = q.c AND t.pair = q.p"
)
_KNOWN_SQLITE = text(
    "SELECT t.client_id, t.pair FROM json_each(:q) AS q JOIN surveillance_actor_pairs AS t"
    " ON t.client_id = json_extract(q.value, '$[0]') AND t.pair = json_extract(q.value, '$[1]')"
)


@functools.cache
def _add_pair(dialect: str) -> Any:
    t = surveillance_actor_pairs
    return (
        _insert(dialect)(t)
        .values(client_id=bindparam("c"), pair=bindparam("p"), first_index=bindparam("i"))
        .on_conflict_do_nothing(index_elements=["client_id", "pair"])
    )


class SqlSurveillanceStore:
    async def claim(self, conn: AsyncConnection) -> int | None:
        if conn.dialect.name == "postgresql":
            got = await conn.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({DETECTOR_LOCK})")
            if not got.scalar():
                return None
        else:  # a write first: the transaction holds SQLite's write lock from here on
            await conn.execute(
                update(surveillance_cursor)
                .where(surveillance_cursor.c.name == CURSOR)
                .values(updated_at=surveillance_cursor.c.updated_at)
            )
        position = (
            await conn.execute(
                select(surveillance_cursor.c.position).where(surveillance_cursor.c.name == CURSOR)
            )
        ).scalar()
        if position is None:
            await ensure_cursor(conn)
            return 0
        return int(position)

    async def advance(self, conn: AsyncConnection, old: int, new: int) -> None:
        result = await conn.execute(
            update(surveillance_cursor)
            .where(surveillance_cursor.c.name == CURSOR, surveillance_cursor.c.position == old)
            .values(position=new, updated_at=int(time.time()))
        )
        if result.rowcount != 1:
            raise CursorMoved(f"the surveillance cursor moved from {old} under this round")

    async def delegations(
        self, conn: AsyncConnection, client_ids: Collection[str]
    ) -> dict[str, Delegation]:
        if not client_ids:
            return {}
        t = surveillance_delegation
        rows = await conn.execute(
            select(t.c.client_id, t.c.exchanges, t.c.max_depth).where(
                t.c.client_id.in_(list(client_ids))
            )
        )
        return {str(r[0]): Delegation(int(r[1]), int(r[2]), stored=True) for r in rows.all()}

    async def known_pairs(self, conn: AsyncConnection, pairs: Collection[Pair]) -> set[Pair]:
        """One statement of constant text whatever the number of pairs (an ``IN`` list of row
        values is compiled anew for each length: ~14 us a pair): PostgreSQL joins two arrays
        unnested, SQLite a JSON array walked by ``json_each``."""
        if not pairs:
            return set()
        if conn.dialect.name == "postgresql":
            clients, digests = [c for c, _ in pairs], [p for _, p in pairs]
            rows = await conn.execute(_KNOWN_PG, {"c": clients, "p": digests})
        else:
            rows = await conn.execute(_KNOWN_SQLITE, {"q": orjson.dumps(list(pairs)).decode()})
        return {(str(r[0]), str(r[1])) for r in rows.all()}

    async def add_pairs(self, conn: AsyncConnection, pairs: Sequence[tuple[Pair, int]]) -> None:
        rows = [{"c": c, "p": p, "i": i} for (c, p), i in pairs]
        if rows:  # one statement text, executed for each row (executemany)
            await conn.execute(_add_pair(conn.dialect.name), rows)

    async def windows(
        self, conn: AsyncConnection, signal: str, keys: Collection[str], first: int, last: int
    ) -> dict[tuple[str, int], Window]:
        if not keys:
            return {}
        t = surveillance_windows
        rows = await conn.execute(
            select(t.c.key, t.c.bucket, t.c.count, t.c.first_index, t.c.alerted_index).where(
                t.c.signal == signal,
                t.c.key.in_(list(keys)),
                t.c.bucket >= first,
                t.c.bucket <= last,
            )
        )
        return {
            (str(r[0]), int(r[1])): Window(int(r[2]), int(r[3]), _int(r[4]), stored=True)
            for r in rows.all()
        }

    async def save(
        self,
        conn: AsyncConnection,
        delegations: dict[str, Delegation],
        windows: dict[tuple[str, str, int], Window],
    ) -> None:
        d = surveillance_delegation
        rows = [
            {"c": c, "exchanges": v.exchanges, "max_depth": v.max_depth}
            for c, v in delegations.items()
        ]
        await _write(
            conn,
            update(d).where(d.c.client_id == bindparam("c")),
            insert(d).values(client_id=bindparam("c")),
            [r for r, v in zip(rows, delegations.values(), strict=True) if v.stored],
            [r for r, v in zip(rows, delegations.values(), strict=True) if not v.stored],
        )
        w = surveillance_windows
        rows = [
            {"s": s, "k": k, "b": b, "count": v.count, "first_index": v.first_index,
             "alerted_index": v.alerted_index}
            for (s, k, b), v in windows.items()
        ]  # fmt: skip
        await _write(
            conn,
            update(w).where(
                w.c.signal == bindparam("s"),
                w.c.key == bindparam("k"),
                w.c.bucket == bindparam("b"),
            ),
            insert(w).values(signal=bindparam("s"), key=bindparam("k"), bucket=bindparam("b")),
            [r for r, v in zip(rows, windows.values(), strict=True) if v.stored],
            [r for r, v in zip(rows, windows.values(), strict=True) if not v.stored],
        )
        for delegation in delegations.values():
            delegation.stored = True
        for window in windows.values():
            window.stored = True


async def _write(
    conn: AsyncConnection,
    update_stmt: Any,
    insert_stmt: Any,
    updates: list[dict[str, Any]],
    inserts: list[dict[str, Any]],
) -> None:
    """One executemany UPDATE of the rows that exist, one executemany INSERT of the new ones."""
    if updates:
        await conn.execute(update_stmt, updates)
    if inserts:
        await conn.execute(insert_stmt, inserts)


async def ensure_cursor(conn: AsyncConnection) -> None:
    """The cursor row at 0 if there is none (idempotent: every process starts with it)."""
    await conn.execute(
        _insert(conn.dialect.name)(surveillance_cursor)
        .values(name=CURSOR, position=0, updated_at=int(time.time()))
        .on_conflict_do_nothing(index_elements=["name"])
    )


async def read_cursor(conn: AsyncConnection) -> int:
    position = (
        await conn.execute(
            select(surveillance_cursor.c.position).where(surveillance_cursor.c.name == CURSOR)
        )
    ).scalar()
    return int(position or 0)


#: Whether an integrated leaf lies at or past the cursor: the log's last index (the primary key's
#: end, one index entry read) against the cursor. Built once: an idle detector runs it every round,
#: and a statement object reused keeps its cache key (nothing is built or keyed per round).
#: ``EXISTS (... WHERE idx >= cursor)``, as it was, got a sequential scan from PostgreSQL's planner
#: (a third of the table estimated to match, so the first match looked a few rows away) that
#: read every leaf already read before it reached the end: 78 ms a round at 300,000 leaves, each
#: second in every process, growing with the log; this reads one index entry whatever its size.
_UNREAD = select(
    func.coalesce(select(func.max(audit_leaves.c.idx)).scalar_subquery(), -1)
    >= func.coalesce(
        select(surveillance_cursor.c.position)
        .where(surveillance_cursor.c.name == CURSOR)
        .scalar_subquery(),
        0,
    )
)


async def has_unread(conn: AsyncConnection) -> bool:
    """Whether an integrated leaf lies at or past the cursor, in one statement (an idle detector's
    whole round)."""
    return bool((await conn.execute(_UNREAD)).scalar())


#: How an entry whose ``actor_chain`` is empty begins: the canonical form (RFC 8785) sorts the
#: envelope's keys, and ``actor_chain`` sorts first. An entry that begins otherwise (a chain, or a
#: key that some day sorts before it) is read and parsed: the test can skip a parse, never a chain.
NO_CHAIN = '{"actor_chain":[],'

_c = audit_leaves.c
#: The entry text where the detector needs a list only the entry holds: a refusal's ``reason_ids``,
#: an issuance's ``actor_chain`` unless it begins empty (:data:`NO_CHAIN`); else NULL. Most leaves
#: of a token load (client credentials, every decision) then cost their columns alone: no entry
#: text is sent or parsed.
_ENTRY_IF_NEEDED = case(
    (_c.type == REFUSED, _c.entry),
    (
        and_(_c.type == ISSUED, func.substr(_c.entry, 1, len(NO_CHAIN)) != NO_CHAIN),
        _c.entry,
    ),
    else_=null(),
)
_LEAVES = select(
    _c.idx,
    _c.type,
    _c.time_ms,
    _c.client_id,
    _c.subject,
    _c.partner,
    _c.transaction_id,
    _ENTRY_IF_NEEDED,
)


#: Leaves fetched per round trip by :func:`read_leaves` (the event loop's turn between them).
READ_PARTITION = 500

#: The leaves a round reads, as a closed range of indices (the log has no gaps, so these are the
#: ``limit`` leaves from ``start``, or fewer at the log's end), built once. Not ``idx >= start
#: ORDER BY idx LIMIT n``: with no statistics (autovacuum off, nothing running ``ANALYZE``)
#: PostgreSQL takes an open range to match a third of the table and each leaf fetched through the
#: key to cost a random read, so the first five executions on each pooled connection (planned with
#: their values; up to 20 connections a process) were a sequential scan and a sort of the whole
#: ledger until it held ~70,000 leaves. A range bounded at both ends by parameters is
#: estimated at 0.5 % of the rows with or without statistics, which only the primary key serves,
#: at any size (docs/surveillance.md, "The read of new leaves").
_NEW_LEAVES = _LEAVES.where(_c.idx >= bindparam("start"), _c.idx < bindparam("end")).order_by(
    _c.idx
)


async def read_leaves(conn: AsyncConnection, start: int, limit: int) -> Sequence[Sequence[Any]]:
    """The integrated leaves from ``start``, in index order, as :meth:`Observed.from_leaf` reads
    them: (index, type, time in ms, client_id, subject, partner, transaction_id, the entry text or
    None), the envelope fields from the leaf's own columns (the sequencer copied them from the
    entry). The sequencer gives indices without gaps and commits them in order, so what is read is a
    prefix of the log."""
    rows: list[Sequence[Any]] = []
    # streamed (a server-side cursor on PostgreSQL), a partition per round trip: thousands of rows
    # turned into rows at once would hold up the event loop for ~2 us each
    result = await conn.stream(_NEW_LEAVES, {"start": start, "end": start + limit})
    async for partition in result.partitions(READ_PARTITION):
        rows += partition
    return rows


async def prune_windows(conn: AsyncConnection, signal: str, before_bucket: int) -> int:
    """Forget the windows of ``signal`` before ``before_bucket`` (no longer any baseline's).

    Every process runs it each minute, so it reads the windows it deletes and no others: a range of
    ``ix_surveillance_windows_signal_bucket``, closed below at the signal's oldest bucket (one probe
    of the index) as :mod:`trustplane.storage.prune` closes the expiry prunes. Through the primary
    key (signal, key, bucket) the bucket bound is no range, and every window of the signal was
    read (a bitmap of the key's whole part, or, ANALYZEd, a sequential scan: ~10-27 ms a round at
    200,000 windows); an open range alone is planned on statistics, stale ones included (autovacuum
    off: an old ``ANALYZE`` whose buckets all lie below the bound puts every window in range),
    while a bound known only at run time takes the planner's default small range either way."""
    t = surveillance_windows
    oldest = select(func.min(t.c.bucket)).where(t.c.signal == signal).scalar_subquery()
    result = await conn.execute(
        delete(t).where(t.c.signal == signal, t.c.bucket >= oldest, t.c.bucket < before_bucket)
    )
    return int(result.rowcount or 0)


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int) else None
