"""Where audit events go: the ledger's append path. ``emit`` returns only once the event is durable.

An append canonicalises the event (:mod:`trustplane.audit.canonical`) and inserts it into the ledger's
pending table in the caller's transaction (or the group-commit writer's). It is acknowledged when that
commits. The sequencer (:mod:`trustplane.audit.ledger`) later gives it its leaf index and puts it in
the Merkle tree, off the request path.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, Protocol, cast

import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit import store
from trustplane.audit.canonical import SURROGATE, entry_parts
from trustplane.audit.tables import LEAF_LIMITS, leaf_value
from trustplane.audit_events import AuditEvent
from trustplane.storage.db import Database
from trustplane.storage.driver_sql import in_transaction
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


def entry_row(event: AuditEvent) -> tuple[str, str, bytes]:
    """(canonical entry, payload, salt): the pending row without its leaf columns (SQLite, whose
    sequencer parses every entry in Python)."""
    entry, payload, salt = entry_parts(event)
    return entry.decode(), payload.decode(), salt


def pending_row(event: AuditEvent) -> store.PendingRow:
    """(canonical entry, payload, salt, the leaf columns: :func:`leaf_columns`) as stored in the
    pending table on PostgreSQL."""
    entry, payload, salt = entry_parts(event)
    return entry.decode(), payload.decode(), salt, *leaf_columns(event)


#: The leaf's text columns, in the order of the pending row, with their lengths.
_TEXT_LEAF = tuple(
    (c, LEAF_LIMITS[c])
    for c in ("event_id", "type", "subject", "client_id", "partner", "transaction_id")
)
#: The leaf columns of an event whose fields are not all strings (or None): the sequencer parses
#: its entry for them, as it does a row written before migration 0028.
UNMAPPED: tuple[None, ...] = (None,) * 7


def leaf_columns(event: AuditEvent) -> tuple[Any, ...]:
    """(event_id, type, time_ms, subject, client_id, partner, transaction_id) of ``event``'s leaf,
    as the sequencer would take them from its entry (``tables.leaf_value``: a value too long for
    its column is ``sha256:`` and its digest; a NUL is U+FFFD, as is a lone surrogate, which the
    entry records replaced). :data:`UNMAPPED` if a field is neither a string nor None."""
    out: list[str | None] = []
    for name, limit in _TEXT_LEAF:
        value = getattr(event, name)
        if value is not None:
            if not isinstance(value, str):
                return UNMAPPED
            value = str(value)  # a StrEnum member (the type) as its plain value
            if not value.isascii():
                value = SURROGATE.sub("\ufffd", value)
            if len(value) > limit or "\x00" in value:
                value = leaf_value(value, limit)
        out.append(value)
    event_id, type_, subject, client_id, partner, transaction_id = out
    return event_id, type_, event.time, subject, client_id, partner, transaction_id


async def write_events(
    conn: AsyncConnection,
    events: Sequence[AuditEvent],
    *,
    alongside: tuple[str, Sequence[Any]] | None = None,
) -> list[None]:
    """Append events in the caller's transaction (and batch handler for the group-commit writer):
    one driver-level multi-row insert into the ledger's pending table.

    PostgreSQL, inside a transaction: the insert goes to asyncpg directly (no SQLAlchemy execution
    layers), and ``alongside`` (an ``INSERT`` whose parameters are numbered from 1, and its
    parameters; the pending insert's own follow) runs as a data-modifying CTE of the same
    statement: both rows in one execution and one round trip (the policy decisions' replay
    inputs: ``policy.recorder``). Elsewhere ``alongside`` must be None (the caller runs its insert
    itself)."""
    driver = await in_transaction(conn)
    if driver is not None:
        rows = [pending_row(e) for e in events]
        if alongside is None:
            insert, params = store.pg_pending_insert(rows, first=1)
            await driver.execute(insert, *params)
        else:
            before = alongside[1]
            insert, params = store.pg_pending_insert(rows, first=len(before) + 1)
            await driver.execute(_pg_append(insert, alongside[0]), *before, *params)
    else:
        if alongside is not None:
            raise ValueError("alongside needs a PostgreSQL transaction")
        row = pending_row if conn.dialect.name == "postgresql" else entry_row
        await store.append_pending(conn, [row(e) for e in events])
    await appended(conn, events)
    return [None] * len(events)


@functools.lru_cache(maxsize=128)
def _pg_append(insert: str, alongside: str) -> str:
    """The pending rows' ``insert`` (:func:`store.pg_pending_insert`) with ``alongside`` as a CTE:
    a text per pair of batch sizes (up to ``VALUES_ROWS`` rows each: one per size)."""
    return f"WITH alongside AS ({alongside}) {insert}"


async def appended(conn: AsyncConnection, events: Sequence[AuditEvent]) -> None:
    """What follows every append in its transaction: the observers, the count, the wake-ups."""
    for observer in OBSERVERS:
        await observer(conn, events)
    with _COUNTING:
        APPENDED[0] += len(events)
    for wake in APPEND_WAKES:
        wake()


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


class _Touched(Exception):
    pass


class _NoConnection:
    """Handed to an audit-sink observer in place of a connection: any use of it means that the
    observer would run a statement for the events it was given."""

    touched = False

    def __getattr__(self, name: str) -> NoReturn:
        self.touched = True
        raise _Touched(name)


async def observers_write_nothing(events: Sequence[AuditEvent]) -> bool:
    """Whether every registered observer leaves the connection alone for ``events``, so that a
    batch may be written as one autocommit statement instead of a transaction (the SSF derivation
    index writes only for tokens issued from another token: none of a client credentials batch,
    never for a decision)."""
    for observer in OBSERVERS:
        if not await _writes_nothing(observer, events):
            return False
    return True


async def _writes_nothing(observer: EventObserver, events: Sequence[AuditEvent]) -> bool:
    """Whether ``observer``, called with ``events``, leaves its connection alone."""
    probe = _NoConnection()
    try:
        await observer(cast(AsyncConnection, probe), events)
    except _Touched:
        return False
    return not probe.touched  # touched: the observer caught what using the connection raised


async def observer_inserts(
    events: Sequence[AuditEvent], first: int
) -> list[tuple[str, Sequence[Any]]] | None:
    """PostgreSQL: what the registered observers would write for ``events``, as inserts to ride in
    a statement of the caller's (their parameters numbered from ``first``, one's after the
    other's): an observer with a ``pg_insert(events, first)`` gives its insert (or None: nothing
    to write); any other must leave the connection alone (:func:`observers_write_nothing`). None
    if one would write otherwise: the batch then runs as a transaction."""
    inserts: list[tuple[str, Sequence[Any]]] = []
    for observer in OBSERVERS:
        as_insert = getattr(observer, "pg_insert", None)
        if as_insert is None:
            if not await _writes_nothing(observer, events):
                return None
            continue
        insert = as_insert(events, first)
        if insert is not None:
            inserts.append(insert)
            first += len(insert[1])
    return inserts
