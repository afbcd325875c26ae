"""Where audit events go: the ledger's append path. ``emit`` returns only once the event is durable.

An append canonicalises the event (:mod:`trustplane.audit.canonical`) and inserts it into the ledger's
pending table in the caller's transaction (or the group-commit writer's). It is acknowledged when that
commits. The sequencer (:mod:`trustplane.audit.ledger`) later gives it its leaf index and puts it in
the Merkle tree, off the request path.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit import store
from trustplane.audit.canonical import entry_parts
from trustplane.audit_events import AuditEvent
from trustplane.storage.db import Database
from trustplane.storage.writer import GroupCommitWriter

log = structlog.get_logger("trustplane.audit")
KIND = "audit"
#: Entries this process appended (the sequencer integrates early when half a batch is waiting).
APPENDED = [0]
_COUNTING = threading.Lock()  # appends also run in the group-commit writer's SQLite thread
#: Called on every append: each running sequencer's wake-up (:meth:`trustplane.audit.ledger.Ledger.run`
#: adds its own while it runs), so a local append wakes it instead of a poll finding it. Safe to call
#: from any thread.
APPEND_WAKES: set[Callable[[], object]] = set()
#: Called in the appending transaction with the events appended (the shared-signals receiver indexes
#: tokens issued from a partner's token here: trustplane.ssf). Each filters on its own issuer.
#: An observer runs statements on the connection only (it may run in the group-commit writer's
#: SQLite thread: storage.sqlite_batch).
EventObserver = Callable[[AsyncConnection, Sequence[AuditEvent]], Awaitable[None]]
OBSERVERS: list[EventObserver] = []


class AuditSink(Protocol):
    """Every component writes audit events through this; implementations must be durable on return."""

    async def emit(self, event: AuditEvent) -> None: ...


def pending_row(event: AuditEvent) -> tuple[str, str, bytes]:
    """(canonical entry, payload, salt) as stored in the pending table."""
    entry, payload, salt = entry_parts(event)
    return entry.decode(), payload.decode(), salt


async def write_events(conn: AsyncConnection, events: Sequence[AuditEvent]) -> list[None]:
    """Append events in the caller's transaction (and batch handler for the group-commit writer):
    one driver-level multi-row insert into the ledger's pending table."""
    await store.append_pending(conn, [pending_row(e) for e in events])
    for observer in OBSERVERS:
        await observer(conn, events)
    with _COUNTING:
        APPENDED[0] += len(events)
    for wake in APPEND_WAKES:
        wake()
    return [None] * len(events)


class SqlAuditSink:
    """Appends to the ledger through the group-commit writer."""

    def __init__(self, writer: GroupCommitWriter) -> None:
        self._writer = writer
        writer.register(KIND, write_events, statements_only=True)

    async def emit(self, event: AuditEvent) -> None:
        await self._writer.submit(KIND, event)
        if event.decision == "deny":
            log.info(
                event.type.value, client_id=event.client_id, jti=event.jti, reason=event.reason
            )
        else:
            log.debug(event.type.value, client_id=event.client_id, jti=event.jti)


async def emit_now(db: Database, event: AuditEvent) -> None:
    """For one-off writers (CLI): a single event in its own transaction."""
    async with db.transaction() as conn:
        await write_events(conn, [event])


def event_body(entry: str, payload: str | None) -> dict[str, Any]:
    """An entry as a dict with its payload back in (``None`` once purged)."""
    body: dict[str, Any] = orjson.loads(entry)
    body["payload"] = orjson.loads(payload) if payload is not None else None
    return body


async def recent_events(
    db: Database, limit: int = 100, type_: str | None = None
) -> list[dict[str, Any]]:
    """The newest events, integrated or still pending, newest first (tests and the CLI)."""
    out: list[dict[str, Any]] = []
    async with db.read() as conn:
        # Pending first, then leaves: an entry integrated in between is seen twice (dropped below),
        # never missed.
        for entry, payload in await store.pending_bodies(conn, 100_000):
            body = event_body(entry, payload)
            if type_ is None or body["type"] == type_:
                out.append(body)
        filters = {"type": type_} if type_ else {}
        seen = {body["event_id"] for body in out}
        for stored in await store.latest_where(conn, filters, limit + len(seen)):
            body = event_body(stored.entry, stored.payload)
            if body["event_id"] not in seen:
                out.append(body)
    return out[:limit]
