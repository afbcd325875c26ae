"""What the Overview and Alerts pages show, read from the ledger, the mandate store and the key,
client and partner registries. The Overview also lists the settlement exceptions not yet resolved
(:mod:`trustplane.console.exceptions`, from the services' events in the ledger).

Counts come from the ledger's leaf index (``ix_audit_leaves_type_time``): exact, over the window.
Deny reasons are taken from the newest refusals only (at most :data:`REASON_SAMPLE`), and the page
says so. Alerts are rules evaluated over the ledger when the page is read: this is a view, not a
notifier (the Prometheus rules in ``deploy/`` page people).
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from cryptography import x509
from sqlalchemy import func, select

from trustplane.audit.ledger import Ledger
from trustplane.audit.tables import audit_leaves
from trustplane.audit_events import AuditEventType
from trustplane.clients.service import ClientService
from trustplane.console.exceptions import ExceptionsView, SettlementException
from trustplane.federation.service import FederationService
from trustplane.keys.service import KeyService
from trustplane.mandates.model import MandateFilter, MandateStatus
from trustplane.mandates.service import MandateService
from trustplane.settings import Settings
from trustplane.storage.db import Database

WINDOW_S = 24 * 3600
SOON_S = 14 * 86400
REASON_SAMPLE = 2000
ISSUED = AuditEventType.TOKEN_ISSUED.value
REFUSALS = (
    AuditEventType.TOKEN_REFUSED.value,
    AuditEventType.AUTHORIZATION_REFUSED.value,
    AuditEventType.POLICY_DECISION_DENIED.value,
)


@dataclass(frozen=True, slots=True)
class Expiring:
    kind: str
    name: str
    at: int
    link: str | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    severity: str
    fired_at: int
    detail: str
    link: str


@dataclass
class Overview:
    window_s: int
    issued: int
    refused: int
    exchanges: int
    denied_decisions: int
    reasons: list[tuple[str, int]]
    reasons_sampled: int
    expiring: list[Expiring]
    alerts: list[Alert] = field(default_factory=list)
    #: settlement exceptions open or escalated, oldest first
    exceptions: list[SettlementException] = field(default_factory=list)
    now: int = 0


def _ms(seconds: int) -> int:
    return seconds * 1000


class OverviewService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        ledger: Ledger,
        mandates: MandateService,
        keys: KeyService,
        clients: ClientService,
        federation: FederationService,
    ) -> None:
        self._settings, self._db, self._ledger = settings, db, ledger
        self.exceptions = ExceptionsView(db)
        self._mandates, self._keys = mandates, keys
        self._clients, self._federation = clients, federation

    async def _count(self, conn: Any, types: tuple[str, ...], since_ms: int) -> int:
        total = 0
        for type_ in types:  # one index range per type (``ix_audit_leaves_type_time``)
            query = select(func.count()).where(
                audit_leaves.c.type == type_, audit_leaves.c.time_ms >= since_ms
            )
            total += int((await conn.execute(query)).scalar_one())
        return total

    async def overview(self, now: int | None = None) -> Overview:
        now = int(time.time()) if now is None else now
        since = _ms(now - WINDOW_S)
        leaves = audit_leaves.c
        async with self._db.read() as conn:
            issued = await self._count(conn, (ISSUED,), since)
            refused = await self._count(conn, REFUSALS[:2], since)
            denied = await self._count(conn, REFUSALS[2:], since)
            # a token exchange is an issue with an actor chain (RFC 8693 §4.1 ``act``)
            exchanges = select(func.count()).where(
                leaves.type == ISSUED,
                leaves.time_ms >= since,
                leaves.entry.not_like('%"actor_chain":[]%'),
            )
            exchanged = int((await conn.execute(exchanges)).scalar_one())
            reasons, sampled = await self._reasons(conn, since)
        return Overview(
            WINDOW_S,
            issued,
            refused,
            exchanged,
            denied,
            reasons,
            sampled,
            await self.expiring(now),
            await self.alerts(now),
            (await self.exceptions.exceptions()).unresolved,
            now,
        )

    async def _reasons(self, conn: Any, since_ms: int) -> tuple[list[tuple[str, int]], int]:
        leaves = audit_leaves.c
        query = (
            select(leaves.entry)
            .where(leaves.type.in_(REFUSALS), leaves.time_ms >= since_ms)
            .order_by(leaves.time_ms.desc())
            .limit(REASON_SAMPLE)
        )
        counts: Counter[str] = Counter()
        rows = (await conn.execute(query)).all()
        for (entry,) in rows:
            parsed = orjson.loads(entry)
            counts[str(parsed.get("reason") or "unspecified")] += 1
        return counts.most_common(8), len(rows)

    # ------------------------------------------------------------------ expiring soon

    async def expiring(self, now: int) -> list[Expiring]:
        out = self._keys_expiring(await self._keys.list_all(), now)
        flt = MandateFilter(expiring_within=SOON_S, status=MandateStatus.ACTIVE, limit=20)
        for m in await self._mandates.list(flt, now):
            assert m.effective_until is not None
            out.append(Expiring("mandate", m.id, m.effective_until, f"/console/mandates/{m.id}"))
        for client in await self._clients.list():
            for name, at in _certificates(client.metadata.get("jwks"), now):
                link = f"/console/clients/{client.client_id}"
                out.append(Expiring("client certificate", f"{client.client_id} {name}", at, link))
        for profile in await self._federation.current():
            for name, at in _certificates(profile.document.get("jwks"), now):
                link = f"/console/partners/{profile.partner_id}"
                out.append(Expiring("partner key", f"{profile.partner_id} {name}", at, link))
        return sorted(out, key=lambda e: e.at)

    def _keys_expiring(self, keys: list[Any], now: int) -> list[Expiring]:
        out: list[Expiring] = []
        interval = self._settings.key_rotation_interval
        for key in keys:
            if key.state.value == "active" and interval and key.activated_at:
                due = key.activated_at + interval
                if due <= now + SOON_S:
                    out.append(Expiring("signing key rotation", key.kid, due, "/console/keys"))
            elif key.remove_after and now <= key.remove_after <= now + SOON_S:
                out.append(
                    Expiring("retired signing key", key.kid, key.remove_after, "/console/keys")
                )
        return out

    # ------------------------------------------------------------------ alerts

    async def alerts(self, now: int | None = None) -> list[Alert]:
        """Rules over the last hour of the ledger, plus the ledger's own integration lag."""
        now = int(time.time()) if now is None else now
        out: list[Alert] = []
        rules = (
            ("Failed sign-ins", AuditEventType.USER_LOGIN_FAILED, 10, "warning"),
            ("Accounts locked", AuditEventType.USER_LOCKED, 1, "warning"),
            ("Authorization code replayed", AuditEventType.CODE_REUSED, 1, "critical"),
            ("Refresh token family revoked", AuditEventType.REFRESH_FAMILY_REVOKED, 1, "critical"),
            ("Token refusals", AuditEventType.TOKEN_REFUSED, 50, "warning"),
            ("Policy denials", AuditEventType.POLICY_DECISION_DENIED, 50, "warning"),
            ("Console actions refused", AuditEventType.CONSOLE_ACTION_REFUSED, 5, "warning"),
        )
        since = _ms(now - 3600)
        leaves = audit_leaves.c
        async with self._db.read() as conn:
            for name, type_, threshold, severity in rules:
                query = select(func.count(), func.max(leaves.time_ms)).where(
                    leaves.type == type_.value, leaves.time_ms >= since
                )
                count, last = (await conn.execute(query)).one()
                if count >= threshold:
                    detail = f"{count} in the last hour (threshold {threshold})"
                    link = f"/console/audit?type={type_.value}&since={now - 3600}"
                    out.append(Alert(name, severity, int(last) // 1000, detail, link))
            out += await _surveillance_alerts(conn, since)
        lag = self._ledger.progress_age()
        if lag is not None and lag > 60:
            out.append(
                Alert(
                    "Ledger integration lag",
                    "critical",
                    now,
                    f"entries waiting {lag:.0f} s to be integrated and signed",
                    "/console/audit",
                )
            )
        return sorted(out, key=lambda a: (a.severity != "critical", -a.fired_at))


#: Surveillance alerts (docs/surveillance.md) shown per entry, newest first, at most this many.
SURVEILLANCE_SHOWN = 20
_SURVEILLANCE_SEVERITY = {"unusual_delegation.new_actor_pair": "info"}


async def _surveillance_alerts(conn: Any, since_ms: int) -> list[Alert]:
    """Each ``surveillance:alert:raised`` entry of the last hour: the detector raised it once, from
    the ledger, so the page shows what is there (no rule evaluated here)."""
    leaves = audit_leaves.c
    query = (
        select(leaves.entry)
        .where(leaves.type == AuditEventType.SURVEILLANCE_ALERT.value, leaves.time_ms >= since_ms)
        .order_by(leaves.idx.desc())
        .limit(SURVEILLANCE_SHOWN)
    )
    out = []
    for (entry,) in (await conn.execute(query)).all():
        e = orjson.loads(entry)
        signal = str(e.get("reason") or "unknown")
        about = {k: e[k] for k in ("client_id", "partner") if e.get(k)}
        who = " ".join(f"{k.removesuffix('_id')} {v}" for k, v in about.items())
        detail = f"{who}: {' '.join(str(r) for r in e.get('reason_ids') or ())}"
        txn = e.get("transaction_id")
        link = (
            f"/console/transactions/{quote(txn, safe='')}"
            if txn and signal.startswith("unusual_delegation.")
            else "/console/audit?" + urlencode({"type": e["type"], **about})
        )
        severity = _SURVEILLANCE_SEVERITY.get(signal, "warning")
        name = f"Surveillance: {signal}"
        out.append(Alert(name, severity, int(e.get("time") or 0) // 1000, detail, link))
    return out


def _certificates(jwks: Any, now: int) -> list[tuple[str, int]]:
    """(kid, notAfter) of each X.509 certificate in a JWKS (``x5c``) that ends within SOON_S."""
    out: list[tuple[str, int]] = []
    if not isinstance(jwks, dict):
        return out
    for key in jwks.get("keys", []) if isinstance(jwks.get("keys"), list) else []:
        chain = key.get("x5c") if isinstance(key, dict) else None
        if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
            continue
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(chain[0]))
        except ValueError:
            continue
        ends = int(cert.not_valid_after_utc.timestamp())
        if ends <= now + SOON_S:
            out.append((str(key.get("kid") or "certificate"), ends))
    return out
