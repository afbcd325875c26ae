"""Where audit events go. ``emit`` returns only once the event is durable."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.events import AuditEvent
from trustplane.audit.tables import audit_events
from trustplane.storage.db import Database
from trustplane.storage.driver_sql import values_clause
from trustplane.storage.writer import GroupCommitWriter

log = structlog.get_logger("trustplane.audit")
KIND = "audit"


class AuditSink(Protocol):
    """Every component writes audit events through this; implementations must be durable on return."""

    async def emit(self, event: AuditEvent) -> None: ...


_COLUMNS = ("event_id", "type", "time_ms", "client_id", "subject", "jti", "transaction_id", "body")


def _row(event: AuditEvent) -> tuple[Any, ...]:
    return (
        event.event_id,
        event.type.value,
        event.time,
        event.client_id,
        event.subject,
        event.jti,
        event.transaction_id,
        orjson.dumps(event).decode(),  # orjson serialises the dataclass as to_dict() would
    )


@functools.lru_cache(maxsize=4)
def _insert_sql(dialect: str) -> str:
    values = values_clause(dialect, len(_COLUMNS), 1)
    return f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) VALUES {values}"  # noqa: S608 - constants


async def write_events(conn: AsyncConnection, events: Sequence[AuditEvent]) -> list[None]:
    """Append events in the caller's transaction (and batch handler for the group-commit writer):
    one driver-level executemany."""
    await conn.exec_driver_sql(_insert_sql(conn.dialect.name), [_row(e) for e in events])
    return [None] * len(events)


class SqlAuditSink:
    """Appends to the ``audit_events`` table through the group-commit writer."""

    def __init__(self, writer: GroupCommitWriter) -> None:
        self._writer = writer
        writer.register(KIND, write_events)

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


async def recent_events(
    db: Database, limit: int = 100, type_: str | None = None
) -> list[dict[str, Any]]:
    query = select(audit_events.c.body).order_by(audit_events.c.seq.desc()).limit(limit)
    if type_:
        query = query.where(audit_events.c.type == type_)
    async with db.read() as conn:
        rows = (await conn.execute(query)).scalars().all()
    return [orjson.loads(r) for r in rows]
