"""Settlement exceptions, as the ledger knows them: read from the entries the reference services'
events became (``POST /audit/events``, :mod:`trustplane.audit.ingest`).

An exception is opened by a ``trade:settlement:exception`` entry, marked escalated by a
``trade:exception:escalated`` entry and closed by a ``trade:exception:resolved`` entry naming it
(the payload's ``exception_id``; the service's event says which). It is open until that last entry
is integrated. Exceptions are keyed by (service, exception id): two services may number their trades
alike. Read-only: resolving stays with the service (its API or ``trustplane reference exceptions
resolve``), whose signed event then closes it here.

The view reads the newest :data:`SCAN` entries of those three types (integrated ones; an entry
pending integration shows up within about one integration interval). An entry whose payload was
purged by retention no longer names its exception and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson
from sqlalchemy import select

from trustplane.audit.tables import audit_leaves, audit_payloads
from trustplane.audit_events import AuditEventType
from trustplane.storage.db import Database

SCAN = 5000
OPENED = AuditEventType.TRADE_SETTLEMENT_EXCEPTION.value
ESCALATED = AuditEventType.TRADE_EXCEPTION_ESCALATED.value
RESOLVED = AuditEventType.TRADE_EXCEPTION_RESOLVED.value


@dataclass(frozen=True, slots=True)
class SettlementException:
    exception_id: str
    service: str
    trade_id: str
    transaction_id: str | None
    reason: str
    status: str  # open | escalated | resolved
    opened_ms: int
    updated_ms: int
    resolution: str | None = None

    def age(self, now_s: int) -> str:
        """How long it has been open (or was, if resolved): ``5 min``, ``3 h``, ``2 d``."""
        end = self.updated_ms if self.status == "resolved" else now_s * 1000
        seconds = max(0, (end - self.opened_ms) // 1000)
        if seconds < 3600:
            return f"{seconds // 60} min"
        if seconds < 2 * 86400:
            return f"{seconds // 3600} h"
        return f"{seconds // 86400} d"


@dataclass(frozen=True, slots=True)
class Exceptions:
    """``unresolved``: open and escalated, oldest first; ``resolved``: the newest first."""

    unresolved: list[SettlementException]
    resolved: list[SettlementException]


class ExceptionsView:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def _entries(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        leaves = audit_leaves.c
        query = (
            select(leaves.entry, audit_payloads.c.payload)
            .select_from(audit_leaves.outerjoin(audit_payloads, audit_payloads.c.idx == leaves.idx))
            .where(leaves.type.in_((OPENED, ESCALATED, RESOLVED)))
            .order_by(leaves.idx.desc())
            .limit(SCAN)
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            (orjson.loads(entry), orjson.loads(payload))
            for entry, payload in reversed(rows)
            if payload is not None
        ]

    async def exceptions(self) -> Exceptions:
        found: dict[tuple[str, str], SettlementException] = {}
        for entry, payload in await self._entries():
            exception_id, event = payload.get("exception_id"), payload.get("event")
            if not isinstance(exception_id, str) or not isinstance(event, dict):
                continue
            key, at = (str(entry.get("issuer")), exception_id), int(entry.get("time") or 0)
            known = found.get(key)
            if entry.get("type") == OPENED:
                found[key] = SettlementException(
                    exception_id, key[0], str(event.get("trade_id")), entry.get("transaction_id"),
                    str(entry.get("reason") or "unspecified"), "open", at, at,
                )  # fmt: skip
            elif known is not None and known.status != "resolved":
                resolved = entry.get("type") == RESOLVED
                status = "resolved" if resolved else "escalated"
                found[key] = replace(
                    known, status=status, updated_ms=at,
                    resolution=entry.get("reason") if resolved else None,
                )  # fmt: skip
        everything = list(found.values())
        unresolved = sorted(
            (e for e in everything if e.status != "resolved"), key=lambda e: e.opened_ms
        )
        resolved = sorted(
            (e for e in everything if e.status == "resolved"), key=lambda e: -e.updated_ms
        )
        return Exceptions(unresolved, resolved[:50])
