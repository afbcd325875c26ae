"""A ledger and detectors over one migrated database: append events (integrated at once, as the
sequencer would), run detector rounds, read back the alerts the ledger holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tests.conftest import KEK, make_settings
from trustplane.audit.ledger import Ledger
from trustplane.audit.sink import recent_events, write_events
from trustplane.audit.tables import audit_leaves
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.settings import Settings, decode_kek
from trustplane.storage.db import Database
from trustplane.surveillance.service import Surveillance
from trustplane.surveillance.store import SqlSurveillanceStore, SurveillanceStore

ISSUER = "http://127.0.0.1:8000"
ALERT = AuditEventType.SURVEILLANCE_ALERT.value
#: A window start for 60-second windows (a multiple of 60,000 ms).
T0 = 30_000_000 * 60_000
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


def issued(
    client: str,
    at_ms: int,
    *,
    actors: tuple[str, ...] = (),
    subject: str | None = None,
    txn: str | None = None,
) -> AuditEvent:
    return AuditEvent(
        type=AuditEventType.TOKEN_ISSUED,
        issuer=ISSUER,
        subject=subject or client,
        client_id=client,
        actor_chain=actors,
        transaction_id=txn,
        decision="allow",
        time=at_ms,
        payload={"grant_type": EXCHANGE if actors else "client_credentials"},
    )


def refused(partner: str, at_ms: int, reason: str = "missing_claim") -> AuditEvent:
    return AuditEvent(
        type=AuditEventType.TOKEN_REFUSED,
        issuer=ISSUER,
        client_id="tp-presenter",
        partner=partner,
        decision="deny",
        reason="invalid_grant",
        reason_ids=(reason,),
        time=at_ms,
    )


@dataclass
class Rig:
    url: str
    settings: Settings
    db: Database
    ledger: Ledger
    extra: list[Database] = field(default_factory=list)

    @classmethod
    async def open(cls, url: str, data_dir: Path, **overrides: Any) -> Rig:
        settings = make_settings(url, data_dir, **overrides)
        db = Database(url)
        ledger = Ledger(settings, db, decode_kek(KEK))
        await ledger.start()
        return cls(url, settings, db, ledger)

    def detector(
        self, store: SurveillanceStore | None = None, *, own_db: bool = False
    ) -> Surveillance:
        """A detector on this database; ``own_db``: with its own engine, as another process."""
        db = self.db
        if own_db:
            db = Database(self.url)
            self.extra.append(db)
        return Surveillance(self.settings, db, store or SqlSurveillanceStore())

    async def append(self, *events: AuditEvent) -> list[int]:
        """Append and integrate; the leaf index of each event, in order."""
        async with self.db.transaction() as conn:
            await write_events(conn, list(events))
        await self.ledger.integrate_all()
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(audit_leaves.c.event_id, audit_leaves.c.idx).where(
                    audit_leaves.c.event_id.in_([e.event_id for e in events])
                )
            )
            found = dict(rows.all())
        return [int(found[e.event_id]) for e in events]

    async def alerts(self) -> list[dict[str, Any]]:
        """Every surveillance alert in the ledger (integrated or pending), oldest first."""
        return list(reversed(await recent_events(self.db, limit=100_000, type_=ALERT)))

    async def close(self) -> None:
        for db in (*self.extra, self.db):
            await db.dispose()
