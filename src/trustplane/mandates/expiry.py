"""The expiry event: expiry itself needs no job (every check reads the clock), but receivers of the
security event stream (resource servers, settlement) should hear of it like of a suspension.

The maintenance task (every minute, every process) finds mandates past ``effective_until`` whose
expiry has not been announced, and for each, in one transaction under the mandate's lock: records
an ``expired`` change (actor ``system:clock``), an audit event ``mandates:mandate:expired`` and a
``token-claims-change`` SET with ``mandate_status: expired``. The lock and the re-check make it
exactly once across processes. Amending the dates re-arms it.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from trustplane import metrics
from trustplane.audit.sink import write_events
from trustplane.mandates import events as sets
from trustplane.mandates.model import MandateAction, MandateChange, MandateStatus
from trustplane.mandates.store import SqlMandateStore
from trustplane.mandates.terms import as_mandate, audit_event
from trustplane.storage.db import Database

log = structlog.get_logger("trustplane.mandates")
ACTOR = "system:clock"
BATCH = 100


async def notify_expired(
    db: Database, store: SqlMandateStore, events: sets.SecurityEvents, issuer: str, now: int
) -> int:
    """Announce up to ``BATCH`` newly expired mandates; returns how many were announced."""
    async with db.read() as conn:
        due = await store.expired_unnotified(conn, now, BATCH)
    done = 0
    for mandate_id in due:
        async with db.transaction() as conn:
            head = await store.lock(conn, mandate_id)
            if (
                head is None
                or head.expiry_notified_at is not None
                or head.status not in (MandateStatus.ACTIVE, MandateStatus.SUSPENDED)
                or head.effective_until is None
                or head.effective_until > now
            ):
                continue  # another process announced it, or it changed meanwhile
            version = (await store.versions(conn, mandate_id, head.current_version))[0]
            change = MandateChange(
                mandate_id, head.current_version, MandateAction.EXPIRED, MandateStatus.EXPIRED,
                ACTOR, None, now,
            )  # fmt: skip
            new_head = replace(head, expiry_notified_at=now)
            await store.save(conn, new_head, None, change)
            await write_events(conn, [audit_event(issuer, version, change)])
            mandate = as_mandate(version, new_head, now)
            claims = {"mandate_status": MandateStatus.EXPIRED.value}
            jti, token = events.build(
                mandate, sets.TOKEN_CLAIMS_CHANGE, initiator="system", reason=None, claims=claims
            )
            await events.record(conn, mandate, sets.TOKEN_CLAIMS_CHANGE, jti, token)
        metrics.MANDATE_CHANGES.labels(action=MandateAction.EXPIRED.value).inc()
        log.info("mandate_expired", mandate_id=mandate_id, version=head.current_version)
        done += 1
    return done
