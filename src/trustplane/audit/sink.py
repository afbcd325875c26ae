"""Where audit events go. ``emit`` returns only once the event is durable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import orjson
import structlog
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.events import AuditEvent
from trustplane.audit.tables import audit_events
from trustplane.storage.db import Database
from trustplane.storage.writer import GroupCommitWriter

log = structlog.get_logger("trustplane.audit")
KIND = "audit"


class AuditSink(Protocol):
    """Every component writes audit events through this; implementations must be durable on return."""

    async def emit(self, event: AuditEvent) -> None: ...


def _row(event: AuditEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "type": str(event.type),
        "time_ms": event.time,
        "client_id": event.client_id,
        "subject": event.subject,
        "jti": event.jti,
        "transaction_id": event.transaction_id,
        "body": orjson.dumps(event.to_dict()).decode(),
    }


async def write_events(conn: AsyncConnection, events: Sequence[AuditEvent]) -> list[None]:
    """Batch handler for the group-commit writer: one multi-row insert."""
    await conn.execute(insert(audit_events), [_row(e) for e in events])
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
