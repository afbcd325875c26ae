"""The detector's state store: a Protocol (what the detector needs, semantics in the docstrings) and
its SQLAlchemy implementation. Stores never commit: every method runs in the caller's transaction,
which :meth:`SurveillanceStore.claim` makes the only detector round on the database until it ends."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.tables import audit_leaves
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
    """A client's exchanges so far and the deepest ``act`` chain among them."""

    exchanges: int = 0
    max_depth: int = 0


@dataclass(slots=True)
class Window:
    """One fixed window of one key: ``count`` entries, the first at ``first_index``; the alert, if
    raised, at ``alerted_index``. ``stored``: the row exists already."""

    count: int
    first_index: int
    alerted_index: int | None = None
    stored: bool = False


class SurveillanceStore(Protocol):
    async def claim(self, conn: AsyncConnection) -> int | None:
        """Make this transaction the one detector round (PostgreSQL: a transaction advisory lock,
        None when another process holds it; SQLite: the database write lock, waited for) and return
        the cursor: the index of the next ledger leaf to read (0 on a new database)."""
        ...

    async def advance(self, conn: AsyncConnection, old: int, new: int) -> None:
        """Move the cursor from ``old`` to ``new``; :class:`CursorMoved` if it is not at ``old``."""
        ...

    async def delegation(self, conn: AsyncConnection, client_id: str) -> Delegation:
        """What is known of the client's exchanges (zeros if nothing)."""
        ...

    async def save_delegation(
        self, conn: AsyncConnection, client_id: str, d: Delegation
    ) -> None: ...

    async def add_pair(
        self, conn: AsyncConnection, client_id: str, subject: str, actor: str, index: int
    ) -> bool:
        """Remember (subject, actor) for the client; True if it had never been seen."""
        ...

    async def windows(
        self, conn: AsyncConnection, signal: str, key: str, first: int, last: int
    ) -> dict[int, Window]:
        """The stored windows of ``key`` with ``first <= bucket <= last``."""
        ...

    async def save_window(
        self, conn: AsyncConnection, signal: str, key: str, bucket: int, window: Window
    ) -> None: ...


def pair_digest(subject: str, actor: str) -> str:
    return hashlib.sha256(f"{len(subject)}:{subject}|{actor}".encode()).hexdigest()


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

    async def delegation(self, conn: AsyncConnection, client_id: str) -> Delegation:
        t = surveillance_delegation
        row = (
            await conn.execute(
                select(t.c.exchanges, t.c.max_depth).where(t.c.client_id == client_id)
            )
        ).first()
        return Delegation(int(row[0]), int(row[1])) if row else Delegation()

    async def save_delegation(self, conn: AsyncConnection, client_id: str, d: Delegation) -> None:
        t = surveillance_delegation
        values = {"exchanges": d.exchanges, "max_depth": d.max_depth}
        result = await conn.execute(update(t).where(t.c.client_id == client_id).values(values))
        if result.rowcount == 0:
            await conn.execute(insert(t).values(client_id=client_id, **values))

    async def add_pair(
        self, conn: AsyncConnection, client_id: str, subject: str, actor: str, index: int
    ) -> bool:
        dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        result = await conn.execute(
            dialect_insert(surveillance_actor_pairs)
            .values(client_id=client_id, pair=pair_digest(subject, actor), first_index=index)
            .on_conflict_do_nothing(index_elements=["client_id", "pair"])
        )
        return bool(result.rowcount == 1)

    async def windows(
        self, conn: AsyncConnection, signal: str, key: str, first: int, last: int
    ) -> dict[int, Window]:
        t = surveillance_windows
        rows = await conn.execute(
            select(t.c.bucket, t.c.count, t.c.first_index, t.c.alerted_index).where(
                t.c.signal == signal, t.c.key == key, t.c.bucket >= first, t.c.bucket <= last
            )
        )
        return {
            int(r[0]): Window(int(r[1]), int(r[2]), _int(r[3]), stored=True) for r in rows.all()
        }

    async def save_window(
        self, conn: AsyncConnection, signal: str, key: str, bucket: int, window: Window
    ) -> None:
        t = surveillance_windows
        values = {
            "count": window.count,
            "first_index": window.first_index,
            "alerted_index": window.alerted_index,
        }
        where = (t.c.signal == signal, t.c.key == key, t.c.bucket == bucket)
        if window.stored and (await conn.execute(update(t).where(*where).values(values))).rowcount:
            return
        await conn.execute(insert(t).values(signal=signal, key=key, bucket=bucket, **values))
        window.stored = True


async def ensure_cursor(conn: AsyncConnection) -> None:
    """The cursor row at 0 if there is none (idempotent: every process starts with it)."""
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    await conn.execute(
        dialect_insert(surveillance_cursor)
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


async def read_leaves(
    conn: AsyncConnection, start: int, limit: int
) -> Sequence[tuple[int, str, str]]:
    """(index, type, entry) of the integrated leaves from ``start``, in index order. The sequencer
    gives indices without gaps and commits them in order, so what is read is a prefix of the log."""
    leaves = audit_leaves.c
    rows = await conn.execute(
        select(leaves.idx, leaves.type, leaves.entry)
        .where(leaves.idx >= start)
        .order_by(leaves.idx)
        .limit(limit)
    )
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows.all()]


async def prune_windows(conn: AsyncConnection, signal: str, before_bucket: int) -> int:
    """Forget the windows of ``signal`` before ``before_bucket`` (no longer any baseline's)."""
    t = surveillance_windows
    result = await conn.execute(delete(t).where(t.c.signal == signal, t.c.bucket < before_bucket))
    return int(result.rowcount or 0)


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int) else None
