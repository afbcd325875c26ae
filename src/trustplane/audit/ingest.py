"""The ledger ingests the reference services' signed trade events (``POST /audit/events``).

A service's events (docs/settlement.md, "Events and the envelope": compact JWS, ES256, ``typ:
trade-event+jwt``) become ledger entries under the envelope's ``txn``, so that a transaction's chain
of authority shows the transitions next to the PDP decisions behind them.

What is accepted, and from whom (no self-granted rights):

- the caller is a client the operator gave ``audit:ingest`` for ``{issuer}/audit`` (the bearer
  guard checks the token; dynamic registration can name neither);
- each event verifies with a key of **the calling client's own registration** (``jwks`` or
  ``jwks_uri``), ES256 only, ``typ`` ``trade-event+jwt``: a client records only what it signed;
- the event's ``iss`` is one of the audiences the operator registered the client as resource server
  for (``resource_server_for``, ``trustplane clients add --resource-server``): the service identity
  the events speak for is the operator's grant, not the client's claim;
- ``jti`` 1-128 characters, ``type`` one of the twelve event types, ``trade_id``, ``transition``,
  ``state`` strings of 1-128 characters, ``envelope`` an object, ``iat`` an integer not in the future (beyond the clock
  skew), ``txn`` absent or a string of at most 128 characters.

A batch is all or nothing: one event refused refuses the batch (400 ``invalid_request`` naming the
event's position and why), nothing is written. Accepted, the batch is one transaction: per event an
``INSERT ... ON CONFLICT DO NOTHING`` of (``iss``, ``jti``) into ``audit_ingested`` and, only for
the events it inserted, the ledger entry. A re-sent event (the forwarder retried after a lost
answer) is answered ``duplicate`` and is not entered twice (the same ``jti`` with another JWS, whose
SHA-256 is kept beside it, is refused: a service reusing an event id is not papered over); two racing requests with the same event
serialise on the primary key (PostgreSQL: the second waits for the first to commit, then inserts
nothing).

The entry: type ``trade:<event type with : for .>`` (``trade:settlement:exception``), ``issuer`` the
event's ``iss``, ``transaction_id`` the envelope's ``txn``, ``subject``/``client_id``/``actor_chain``/
``mandate``/``authorization_details_digest``/``policy_bundle_version`` from the envelope, ``jti`` the
event's, ``time`` its ``iat``, ``reason`` the exception's reason (for ``settlement.exception``), and
in the payload the event's claims and the JWS itself: the evidence an auditor re-verifies offline
with the service's JWKS (``trustplane.reference.events.verify_event``). The entry's ``event_id`` is
derived from (``iss``, ``jti``), so it is the same whichever request recorded it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NewType

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.sink import write_events
from trustplane.audit.tables import audit_ingested
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.clients.model import Client
from trustplane.clients.remote_jwks import RemoteJwksCache, signed_with
from trustplane.events.formats import TRADE_EVENT_ALG as ALG
from trustplane.events.formats import TRADE_EVENT_TYP as EVENT_TYP
from trustplane.jose.jws import JWSError, parse
from trustplane.storage.db import Database

#: Most events in one request, and the largest one (a compact JWS).
MAX_EVENTS = 100
MAX_EVENT_BYTES = 16 * 1024
#: How far in the future an event's ``iat`` may be (clock skew between the service and us).
MAX_FUTURE_S = 300
SERVICE = "trustplane.reference"
EVENT_TYPES = {
    "order.created": AuditEventType.TRADE_ORDER_CREATED,
    "trade.executed": AuditEventType.TRADE_EXECUTED,
    "allocation.proposed": AuditEventType.TRADE_ALLOCATION_PROPOSED,
    "allocation.approved": AuditEventType.TRADE_ALLOCATION_APPROVED,
    "settlement.submitted": AuditEventType.TRADE_SETTLEMENT_SUBMITTED,
    "settlement.amended": AuditEventType.TRADE_SETTLEMENT_AMENDED,
    "settlement.cancelled": AuditEventType.TRADE_SETTLEMENT_CANCELLED,
    "settlement.settled": AuditEventType.TRADE_SETTLEMENT_SETTLED,
    "settlement.failed": AuditEventType.TRADE_SETTLEMENT_FAILED,
    "settlement.exception": AuditEventType.TRADE_SETTLEMENT_EXCEPTION,
    "exception.escalated": AuditEventType.TRADE_EXCEPTION_ESCALATED,
    "exception.resolved": AuditEventType.TRADE_EXCEPTION_RESOLVED,
}

#: The claims of an event whose signature, key, issuer and form were checked.
VerifiedEvent = NewType("VerifiedEvent", dict[str, Any])


class EventRefused(Exception):
    """An event that is not recorded; ``reason_id`` names the rule, the message says what failed."""

    def __init__(self, position: int, reason_id: str, detail: str) -> None:
        super().__init__(f"event {position}: {detail}")
        self.position, self.reason_id = position, reason_id


@dataclass(frozen=True, slots=True)
class Ingested:
    """One event's outcome: ``recorded`` now, or ``duplicate`` (recorded before)."""

    jti: str
    event_id: str
    status: str

    def as_dict(self) -> dict[str, str]:
        return {"jti": self.jti, "event_id": self.event_id, "status": self.status}


def entry_id(issuer: str, jti: str) -> str:
    """The ledger entry id of an event: 16 bytes of SHA-256(iss || 0x00 || jti), hex."""
    return hashlib.sha256(f"{issuer}\x00{jti}".encode()).hexdigest()[:32]


async def verify(
    position: int, compact: Any, client: Client, remote: RemoteJwksCache, now: float
) -> VerifiedEvent:
    """The claims of event ``position`` of the batch, checked as the module docstring says."""

    def refuse(reason_id: str, detail: str) -> EventRefused:
        return EventRefused(position, reason_id, detail)

    if not isinstance(compact, str) or len(compact) > MAX_EVENT_BYTES:
        raise refuse("malformed", f"must be a compact JWS of at most {MAX_EVENT_BYTES} characters")
    try:
        parsed = parse(compact)
    except JWSError as exc:
        raise refuse("malformed", str(exc)) from None
    except ValueError as exc:  # base64url or ASCII
        raise refuse("malformed", f"not a compact JWS ({exc})") from None
    if parsed.header.get("alg") != ALG or parsed.header.get("typ") != EVENT_TYP:
        raise refuse("typ", f"the header must have alg {ALG} and typ {EVENT_TYP}")
    ok, _kid, _tried = await signed_with(parsed, client.keys, client.jwks_uri, remote)
    if not ok:
        raise refuse("signature", "the signature does not verify with the client's registered keys")
    try:
        claims = parsed.claims()
    except JWSError as exc:
        raise refuse("malformed", str(exc)) from None
    return VerifiedEvent(_checked_claims(claims, client, now, refuse))


def _checked_claims(
    claims: dict[str, Any], client: Client, now: float, refuse: Any
) -> dict[str, Any]:
    iss = claims.get("iss")
    if not isinstance(iss, str) or iss not in client.resource_server_for:
        raise refuse("issuer", "iss is not a service this client is registered for")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 128:
        raise refuse("jti", "jti must be a string of 1 to 128 characters")
    if claims.get("type") not in EVENT_TYPES:
        raise refuse("type", f"unknown event type {str(claims.get('type'))[:64]!r}")
    if not all(_short(claims.get(k)) for k in ("trade_id", "transition", "state")):
        raise refuse("malformed", "trade_id, transition and state must be strings of 1 to 128")
    iat, envelope = claims.get("iat"), claims.get("envelope")
    if type(iat) is not int or iat > now + MAX_FUTURE_S or iat < 0:
        raise refuse("iat", "iat must be an integer time, not in the future")
    if not isinstance(envelope, dict):
        raise refuse("malformed", "the envelope must be an object")
    txn = envelope.get("txn")
    if txn is not None and (not isinstance(txn, str) or not 0 < len(txn) <= 128):
        raise refuse("txn", "the envelope's txn must be a string of 1 to 128 characters")
    return claims


def _short(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 128


def _text(value: Any, limit: int = 256) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def exception_id(claims: Mapping[str, Any]) -> str | None:
    """The exception an event is about: ``data.exception_id`` (escalated, resolved), else
    ``<trade_id>.<n>`` of the transition ``exception#n`` (the event that opened it)."""
    data = claims.get("data")
    found = data.get("exception_id") if isinstance(data, dict) else None
    if isinstance(found, str):
        return found
    transition = str(claims.get("transition", ""))
    if transition.startswith("exception#"):
        return f"{claims.get('trade_id')}.{transition.split('#', 1)[1]}"
    return None


def _reason(claims: Mapping[str, Any]) -> str | None:
    """The exception's reason id (``mandate_not_usable`` ...) or the resolution, for the entry."""
    data = claims.get("data")
    if not isinstance(data, dict):
        return None
    mandate = data.get("mandate")
    if claims.get("type") == "settlement.exception" and isinstance(mandate, dict):
        return _text(mandate.get("reason"), 64)
    return _text(data.get("resolution"), 64)


def audit_event(claims: VerifiedEvent, compact: str, client_id: str) -> AuditEvent:
    """The ledger entry of a verified event (see the module docstring)."""
    envelope: dict[str, Any] = claims["envelope"]
    mandate = envelope.get("mandate")
    mandate = mandate if isinstance(mandate, dict) else {}
    version = mandate.get("version")
    act = envelope.get("act")
    chain = (
        tuple(str(a.get("sub"))[:256] for a in act if isinstance(a, dict))
        if isinstance(act, list)
        else ()
    )
    return AuditEvent(
        type=EVENT_TYPES[claims["type"]],
        issuer=str(claims["iss"]),
        subject=_text(envelope.get("sub")),
        client_id=_text(envelope.get("client_id"), 128),
        actor_chain=chain[:8],
        mandate_id=_text(mandate.get("id"), 128),
        mandate_version=version if type(version) is int and 0 <= version < 2**31 else None,
        authorization_details_digest=_text(envelope.get("authorization_details_digest"), 64),
        transaction_id=_text(envelope.get("txn"), 128),
        jti=claims["jti"],
        reason=_reason(claims),
        policy_bundle_version=_text(envelope.get("policy_bundle_version"), 128),
        service=SERVICE,
        payload={
            "event": dict(claims),
            "exception_id": exception_id(claims),
            "ingested_by": client_id,
            "jws": compact,
        },
        time=claims["iat"] * 1000,
        event_id=entry_id(str(claims["iss"]), claims["jti"]),
        correlation_id=None,
    )


def _digest(compact: str) -> str:
    return hashlib.sha256(compact.encode("ascii")).hexdigest()


async def _claim(
    conn: AsyncConnection, position: int, event: AuditEvent, compact: str, client_id: str, now: int
) -> bool:
    """Insert the (issuer, jti) row; True when this transaction inserted it, False for a duplicate
    (the same JWS recorded before). The same ``jti`` with another JWS is refused."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    digest = _digest(compact)
    result = await conn.execute(
        insert(audit_ingested)
        .values(
            issuer=event.issuer,
            jti=event.jti,
            event_id=event.event_id,
            digest=digest,
            client_id=client_id,
            type=event.type.value,
            transaction_id=event.transaction_id,
            ingested_at=now,
        )
        .on_conflict_do_nothing(index_elements=["issuer", "jti"])
    )
    if result.rowcount == 1:
        return True
    found = audit_ingested.c
    stored = await conn.scalar(
        select(found.digest).where(found.issuer == event.issuer, found.jti == event.jti)
    )
    if stored != digest:
        raise EventRefused(
            position, "jti_reused", "this jti was recorded before with another content"
        )
    return False


class IngestService:
    """Verifies a client's batch and records it, once per event (see the module docstring)."""

    def __init__(self, db: Database, remote: RemoteJwksCache) -> None:
        self._db, self._remote = db, remote

    async def ingest(self, client: Client, batch: Sequence[Any]) -> list[Ingested]:
        now = time.time()
        verified = [
            (await verify(i, compact, client, self._remote, now), str(compact))
            for i, compact in enumerate(batch)
        ]
        events = [audit_event(claims, compact, client.client_id) for claims, compact in verified]
        fresh: set[int] = set()
        async with self._db.transaction() as conn:
            # rows claimed in one order whatever the batch's: two batches holding the same events
            # in another order wait for each other instead of deadlocking
            for i in sorted(range(len(events)), key=lambda i: events[i].event_id):
                compact = verified[i][1]
                if await _claim(conn, i, events[i], compact, client.client_id, int(now * 1000)):
                    fresh.add(i)
            if fresh:  # appended in the batch's order (the service's commit order)
                await write_events(conn, [e for i, e in enumerate(events) if i in fresh])
        return [
            Ingested(str(e.jti), e.event_id, "recorded" if i in fresh else "duplicate")
            for i, e in enumerate(events)
        ]
