"""The security events of the authorization server: a typed view of the audit ledger.

The ledger is the outbox (docs/events.md, "Why the ledger is the outbox"). Every change this stream
reports (a revocation, a mandate transition, a client registered or disabled, a signing key
rotated, a partner profile changed, a policy bundle activated) already writes its audit event with
``audit.sink.write_events`` in the change's own transaction, and a surveillance alert goes through
the audit sink like any event; so an event is in the ledger iff its change committed. The
sequencer gives each entry a leaf index under one lock, in one transaction, never reused, never
reordered: that index is the cursor. A reader at cursor N can never miss an entry that commits
later with a smaller number (the gap an auto-increment outbox read by cursor has).

An event is served as a compact JWS (``typ: security-event+jwt``) signed with the deployment's
active signing key, verifiable from ``/jwks``. Signing happens when the event is read: the entry
is immutable, the signature binds its ledger index and leaf hash, and a key rotation needs no
re-signing of stored rows. The personal payload is not in the event (it stays in the ledger,
purgeable); ``ledger.payload_hash`` commits to it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit import store as audit_store
from trustplane.audit.tables import audit_leaves, audit_payloads, audit_tree
from trustplane.audit_events import AuditEventType as T
from trustplane.jose.jws import Signer
from trustplane.keys.service import KeyRing, KeyService
from trustplane.storage.db import Database

#: Explicit typing (RFC 8725 §3.11). Not RFC 8417's ``secevent+jwt``: a SET verifier refuses these
#: and our consumers refuse SETs, so neither can be replayed as the other.
EVENT_TYP = "security-event+jwt"
#: The issue's ``surveillance.alert``, named by the ledger's ``component:subject:action`` rule:
#: emitted by the surveillance component through the audit sink (docs/surveillance.md).
SURVEILLANCE_ALERT = T.SURVEILLANCE_ALERT.value
SECURITY_TYPES: frozenset[str] = frozenset(
    {
        *(
            t.value
            for t in (
                T.TOKEN_REVOKED,
                T.REFRESH_FAMILY_REVOKED,
                T.CODE_REUSED,
                T.MANDATE_CREATED,
                T.MANDATE_ACCEPTED,
                T.MANDATE_AMENDED,
                T.MANDATE_SUSPENDED,
                T.MANDATE_RESUMED,
                T.MANDATE_REVOKED,
                T.MANDATE_EXPIRED,
                T.CLIENT_REGISTERED,
                T.CLIENT_UPDATED,
                T.CLIENT_DISABLED,
                T.CLIENT_DELETED,
                T.KEY_CREATED,
                T.KEY_ACTIVATED,
                T.KEY_RETIRED,
                T.KEY_REMOVED,
                T.PARTNER_ADDED,
                T.PARTNER_UPDATED,
                T.PARTNER_DISABLED,
                T.POLICY_BUNDLE_ACTIVATED,
                T.POLICY_BUNDLE_ROLLED_BACK,
                T.USER_LOCKED,
            )
        ),
        SURVEILLANCE_ALERT,
    }
)
#: Ledger entries one read scans at most: a page with no security event in the window still
#: moves the cursor, so a read never scans the whole ledger.
SCAN_WINDOW = 10_000
#: Payload members copied into an event's ``data`` (a signing key's ``kid`` and ``alg``).
PUBLIC_PAYLOAD = ("kid", "alg")
MAX_PAGE = 500
MAX_WAIT = 30.0
POLL = 0.1


class CursorError(ValueError):
    """A cursor that is not one this server gave out (the message says why)."""


def parse_cursor(raw: str | None) -> int:
    """A cursor is a ledger index in decimal (``0``: from the start)."""
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
        raise CursorError("the cursor must be a decimal integer >= 0 given by this server")
    return int(raw)


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """An integrated entry; ``public``: the members of its payload on :data:`PUBLIC_PAYLOAD`."""

    index: int
    entry: dict[str, Any]
    leaf_hash: bytes
    public: dict[str, Any] = field(default_factory=dict)


def _public(payload: str | None) -> dict[str, Any]:
    """The payload members an event may carry: identifiers of things, never of people (the rest
    stays in the ledger, purgeable; ``ledger.payload_hash`` commits to all of it)."""
    if payload is None:
        return {}
    body = orjson.loads(payload)
    return {k: body[k] for k in PUBLIC_PAYLOAD if isinstance(body, dict) and k in body}


@dataclass(frozen=True, slots=True)
class Page:
    """Events from the cursor on, and the cursor to continue from: ``more`` when the ledger holds
    entries past ``next`` already (read again at once)."""

    events: list[LedgerEvent]
    next: int
    size: int

    @property
    def more(self) -> bool:
        return self.next < self.size


async def tree_size(conn: AsyncConnection) -> int:
    state = await audit_store.read_state(conn)
    return state[0] if state else 0


async def read_page(
    conn: AsyncConnection, after: int, limit: int, types: Iterable[str] = SECURITY_TYPES
) -> Page:
    """The security events at ledger indices ``after`` <= i, at most ``limit``, scanning at most
    :data:`SCAN_WINDOW` entries. A cursor beyond the ledger is refused (:class:`CursorError`)."""
    size = await tree_size(conn)
    if after > size:
        raise CursorError(f"the cursor {after} is beyond the ledger (size {size})")
    end = min(size, after + SCAN_WINDOW)
    query = (
        select(
            audit_leaves.c.idx, audit_leaves.c.entry, audit_tree.c.hash, audit_payloads.c.payload
        )
        .select_from(
            audit_leaves.join(audit_tree, audit_tree.c.id == audit_leaves.c.idx).outerjoin(
                audit_payloads, audit_payloads.c.idx == audit_leaves.c.idx
            )
        )
        .where(
            audit_leaves.c.idx >= after,
            audit_leaves.c.idx < end,
            audit_leaves.c.type.in_(sorted(types)),
        )
        .order_by(audit_leaves.c.idx)
        .limit(limit)
    )
    rows = (await conn.execute(query)).all()
    events = [LedgerEvent(int(r[0]), orjson.loads(r[1]), bytes(r[2]), _public(r[3])) for r in rows]
    following = events[-1].index + 1 if len(events) == limit else end
    return Page(events, following, size)


def event_claims(
    event: LedgerEvent, *, issuer: str, origin: str, now: int | None = None
) -> dict[str, Any]:
    """The JWS payload of one event (docs/events.md, "The event")."""
    e = event.entry
    mandate = (
        {"id": e["mandate_id"], "version": e.get("mandate_version")}
        if e.get("mandate_id")
        else None
    )
    return {
        "iss": issuer,
        "jti": e["event_id"],
        "iat": int(now if now is not None else time.time()),
        "type": e["type"],
        "time": e["time"],
        "seq": event.index,
        "envelope": {
            "txn": e.get("transaction_id"),
            "sub": e.get("subject"),
            "client_id": e.get("client_id"),
            "act": [{"sub": actor} for actor in e.get("actor_chain") or ()],
            "mandate": mandate,
            "authorization_details_digest": e.get("authorization_details_digest"),
            "decision_ids": _decision_ids(e),
            "policy_bundle_version": e.get("policy_bundle_version"),
        },
        "data": {**{name: e.get(name) for name in _DATA}, **event.public},
        "ledger": {
            "origin": origin,
            "index": event.index,
            "leaf_hash": base64.b64encode(event.leaf_hash).decode(),
            "payload_hash": e.get("payload_hash"),
        },
    }


_DATA = ("partner", "audience", "scopes", "jti", "decision", "reason", "reason_ids",
         "correlation_id", "service", "region", "purpose")  # fmt: skip


def _decision_ids(entry: Mapping[str, Any]) -> list[str]:
    """PDP decisions are ledger entries whose event id is the decision id; an event that rests on
    one names it in ``reason_ids`` as ``decision:<id>`` (the envelope has no other place)."""
    return [r[9:] for r in entry.get("reason_ids") or () if r.startswith("decision:")]


class SecurityEvents:
    """Reads and signs the stream; waits for new events (the long poll of ``GET /events``)."""

    def __init__(self, db: Database, keys: KeyService, *, issuer: str, origin: str) -> None:
        self._db, self._keys, self.issuer, self.origin = db, keys, issuer, origin
        self._signed_by: tuple[KeyRing, Signer] | None = None

    def sign(self, event: LedgerEvent) -> str:
        """The event as a compact JWS under the active signing key (``NoActiveKeyError`` if none)."""
        ring = self._keys.ring
        if self._signed_by is None or self._signed_by[0] is not ring:
            self._signed_by = (ring, ring.require_signer().with_typ(EVENT_TYP))
        claims = event_claims(event, issuer=self.issuer, origin=self.origin)
        return self._signed_by[1].sign(claims)

    async def page(self, after: int, limit: int) -> Page:
        async with self._db.read() as conn:
            return await read_page(conn, after, min(max(limit, 1), MAX_PAGE))

    async def wait(self, after: int, limit: int, wait: float) -> Page:
        """:meth:`page`, waiting up to ``wait`` seconds for a first event when there is none: the
        ledger size is polled (one primary-key read) every :data:`POLL` seconds."""
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
        page = await self.page(after, limit)
        while not page.events and not page.more and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
            async with self._db.read() as conn:
                grown = await tree_size(conn) > page.next
            if grown:
                page = await self.page(page.next, limit)
        return page
