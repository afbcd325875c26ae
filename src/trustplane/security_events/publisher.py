"""The security events into NATS JetStream: the ledger as the generic publisher's outbox.

Stream ``<PREFIX>_SECURITY`` (subjects ``<prefix>.security.>``); an event of type
``mandates:mandate:revoked`` goes to ``<prefix>.security.mandates.mandate.revoked``,
``surveillance.alert`` to ``<prefix>.security.surveillance.alert``. ``Nats-Msg-Id`` is the event id.

Every ``trustplane serve`` process runs the loop; one publishes at a time. On PostgreSQL a round is
one transaction holding an advisory lock (the others skip the round): it reads the publisher's
position, the events after it, publishes them (waiting for each ack) and moves the position past
what was acked, then commits. Killed (``kill -9``) mid-round, the transaction rolls back and the
next round, in any process, publishes the same events again: JetStream drops them by
``Nats-Msg-Id`` within the stream's duplicate window. NATS down: the position stays, the ledger
keeps the events, the loop backs off and drains them when NATS is back. SQLite serves a single
process: there the position moves by compare-and-set, without a lock.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.events.jetstream import Claim, Outgoing, Stream, VerifyingConsumer
from trustplane.security_events.stream import LedgerEvent, SecurityEvents, read_page
from trustplane.security_events.tables import security_event_cursors as cursors
from trustplane.security_events.verify import verify_event
from trustplane.storage.db import Database

#: pg_try_advisory_xact_lock key of the publisher: "tp-event" as a 63-bit integer.
PUBLISHER_LOCK = int.from_bytes(b"tp-event", "big") & 0x7FFF_FFFF_FFFF_FFFF
DOMAIN = "security"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def stream(prefix: str) -> Stream:
    return Stream(f"{prefix.upper()}_{DOMAIN.upper()}", (f"{prefix}.{DOMAIN}.>",))


def subject_of(prefix: str, event_type: str) -> str:
    """``component:subject:action`` (or ``a.b``) as NATS tokens: one per part, unsafe chars to _."""
    tokens = [_UNSAFE.sub("_", t) or "_" for t in re.split(r"[:.]", event_type)]
    return ".".join([prefix, DOMAIN, *tokens])


class LedgerOutbox:
    """The publisher's claim on the ledger: the events after its position (docs/events.md)."""

    def __init__(
        self, db: Database, events: SecurityEvents, *, prefix: str, name: str = "jetstream"
    ) -> None:
        self._db, self._events, self.prefix, self.name = db, events, prefix, name

    @asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[Claim]:
        failure: Exception | None = None
        async with self._db.transaction() as conn:
            if not await _lock(conn):  # another process is publishing this round
                yield Claim([])
                return
            position = await _position(conn, self.name)
            page = await read_page(conn, position, limit)
            claim = Claim([self._outgoing(e) for e in page.events], more=page.more)
            try:
                yield claim
            except Exception as exc:  # record what was acked, then fail
                failure = exc
            done = page.events[claim.acked].index if claim.acked < len(page.events) else page.next
            if done != position:
                await _advance(conn, self.name, position, done)
        if failure is not None:
            raise failure

    def _outgoing(self, event: LedgerEvent) -> Outgoing:
        return Outgoing(
            subject_of(self.prefix, event.entry["type"]),
            self._events.sign(event).encode("ascii"),
            event.entry["event_id"],
            event.entry["time"] / 1000,
        )

    async def position(self) -> int:
        async with self._db.read() as conn:
            row = (
                await conn.execute(select(cursors.c.position).where(cursors.c.name == self.name))
            ).first()
        return int(row[0]) if row else 0


async def _lock(conn: AsyncConnection) -> bool:
    if conn.dialect.name != "postgresql":
        return True
    got = await conn.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({PUBLISHER_LOCK})")
    return bool(got.scalar())


async def _position(conn: AsyncConnection, name: str) -> int:
    """The publisher's position, created at 0 (the whole ledger) the first time."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    await conn.execute(
        insert(cursors).values(name=name, position=0, updated_at=0).on_conflict_do_nothing()
    )
    row = (await conn.execute(select(cursors.c.position).where(cursors.c.name == name))).one()
    return int(row[0])


async def _advance(conn: AsyncConnection, name: str, old: int, new: int) -> None:
    """Compare-and-set: a publisher that lost a race (SQLite, several processes) moves nothing."""
    await conn.execute(
        update(cursors)
        .where(cursors.c.name == name, cursors.c.position == old)
        .values(position=new, updated_at=int(time.time()))
    )


def verifying_consumer(
    js: Any, *, prefix: str, durable: str, jwks: Any, issuer: str, ack_wait: float = 30.0
) -> VerifyingConsumer:
    """A durable explicit-ack consumer of the security stream that acts only on events verified
    against ``jwks`` (the authorization server's ``/jwks``, fetched by the caller)."""

    def verify(data: bytes) -> dict[str, Any]:
        return verify_event(data, jwks, issuer=issuer)

    return VerifyingConsumer(
        js, stream(prefix).name, f"{prefix}.{DOMAIN}.>", durable, verify, ack_wait=ack_wait
    )
