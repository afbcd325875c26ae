"""The SSF receiver: a partner's Security Event Tokens make the tokens we derived from its tokens
inactive.

What "derived" means is recorded when we issue: every access token issued here from a partner's
token (token exchange of a partner access token or assertion: ``prv`` = its ``iss`` + ``jti``;
jwt-bearer: ``origin`` = its ``iss`` + ``sub``) or from one of our own tokens (a local exchange) is
indexed in ``ssf_derivations``, in the same transaction as its issuance record
(:func:`Derivations.observe`, an observer of the audit sink).

A SET (pushed to ``POST /ssf/receiver``, RFC 8935) is accepted only when it is a JWS with ``typ``
``secevent+jwt``, signed by an active partner with a key of its trust profile, ``aud`` names our
receiver endpoint, and its subject belongs to the partner that signed it (a partner cannot revoke
another issuer's tokens). Then, in one transaction, every local token derived from the subject (and
every local token derived from those, transitively) is revoked: the bearer guard and introspection
refuse it, and our own transmitter tells our receivers in turn (the revocation observer), so a
revocation travels down a chain of issuers.

A revocation of one of our own tokens made here (``POST /revoke``, a reused code or refresh token)
follows the same index: :meth:`Receiver.on_revoked`, also a revocation observer, revokes every token
exchanged here from it, transitively, in the revoking transaction, each with its ledger entry.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.sink import write_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.bearer_guard import RevokedTokens
from trustplane.federation.profile import TrustProfile
from trustplane.federation.registry import PartnerRegistry, PartnerTokenError
from trustplane.ssf.tables import ssf_derivations
from trustplane.ssf.transmitter import SESSION_REVOKED, SET_TYPE, TOKEN_CLAIMS_CHANGE
from trustplane.storage.db import Database
from trustplane.storage.driver_sql import by_column, in_transaction, unnest_insert, values_clause
from trustplane.storage.prune import delete_expired

log = structlog.get_logger("trustplane.ssf")
#: How deep a local chain of exchanges is followed (our exchanges are bounded far below this).
MAX_CHAIN = 16
ACTED_ON = (SESSION_REVOKED, TOKEN_CLAIMS_CHANGE)
#: Bounds on a transmitter's ``critical_subject_members`` (SSF 1.0 §7.1): names, and their length.
MAX_CRITICAL_MEMBERS, MAX_MEMBER_NAME = 32, 64
#: Set while this task follows derivations itself (a SET's revocation, a local cascade): the
#: revocations it makes along the way do not start cascades of their own.
_FOLLOWING: ContextVar[bool] = ContextVar("trustplane_ssf_following", default=False)


class SetRefused(Exception):
    """RFC 8935 §2.3: the SET is refused; ``err`` is the error code of the answer."""

    def __init__(self, err: str, description: str) -> None:
        super().__init__(description)
        self.err, self.description = err, description


@dataclass(frozen=True, slots=True)
class Received:
    jti: str
    partner_id: str
    events: tuple[str, ...]
    revoked: tuple[str, ...]


class Derivations:
    """The index of tokens issued here from another token (see the module docstring)."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        #: The audit sink observer (``sink.OBSERVERS``): one object, so that it is found and
        #: removed again by identity.
        self.observe = _Observer(self)

    def pg_insert(
        self, events: Sequence[AuditEvent], first: int
    ) -> tuple[str, tuple[list[Any], ...]] | None:
        """PostgreSQL: the index rows of ``events`` as one insert and its parameters (numbered
        from ``first``), for a caller that runs it inside a statement of its own (the token
        endpoint's one-statement batch: ``grant.outcomes``); None if there is nothing to index."""
        rows = [row for e in events if (row := self._row(e)) is not None]
        if not rows:
            return None
        sql = unnest_insert("ssf_derivations", _DERIVED, first=first) + _CONFLICT
        return sql, by_column(rows, len(_DERIVED))

    def _row(self, event: AuditEvent) -> tuple[Any, ...] | None:
        if event.type is not AuditEventType.TOKEN_ISSUED or event.issuer != self.issuer:
            return None
        payload = event.payload
        if event.jti is None or event.client_id is None or not isinstance(payload, dict):
            return None
        exchange = payload.get("exchange")
        origin = payload.get("origin")
        subject = exchange.get("subject_token") if isinstance(exchange, dict) else None
        if isinstance(subject, dict) and isinstance(subject.get("iss"), str):
            iss, jti, sub = subject["iss"], subject.get("jti"), None
            if isinstance(origin, dict) and origin.get("iss") == iss:
                sub = origin.get("sub")
        elif isinstance(origin, dict) and isinstance(origin.get("iss"), str):
            iss, jti, sub = origin["iss"], None, origin.get("sub")
        else:
            return None
        mandate = exchange.get("subject_mandate") if isinstance(exchange, dict) else None
        mandate_id = mandate.get("id") if isinstance(mandate, dict) else None
        exp = payload.get("exp")
        return (
            event.jti,
            event.client_id,
            int(exp) if isinstance(exp, int) else int(time.time()) + 86400,
            iss[:512],
            str(jti)[:256] if jti is not None else None,
            str(sub)[:512] if sub is not None else None,
            str(mandate_id)[:128] if mandate_id is not None else None,
        )

    async def prune(self, conn: AsyncConnection, now: int) -> int:
        return await delete_expired(conn, ssf_derivations, ssf_derivations.c.expires_at, now)


#: ``ssf_derivations``' columns in :meth:`Derivations._row`'s order, with their PostgreSQL types.
_DERIVED = (
    ("jti", "text"),
    ("client_id", "text"),
    ("expires_at", "bigint"),
    ("origin_iss", "text"),
    ("origin_jti", "text"),
    ("origin_sub", "text"),
    ("origin_mandate", "text"),
)
_CONFLICT = " ON CONFLICT (jti) DO NOTHING"


async def insert_derivations(conn: AsyncConnection, rows: Sequence[tuple[Any, ...]]) -> None:
    """The rows, in the caller's transaction (an exchange batch of the group-commit writer), as
    driver-level statements: a multi-row ``VALUES`` built with SQLAlchemy Core was compiled anew for
    every batch (~150-400 us of CPU per exchange on SQLite). PostgreSQL: one ``unnest`` insert, on
    the writer's open transaction directly when there is one. SQLite: one multi-row insert, its text
    kept per row count (``executemany`` steps its statement once per row, and every step lets go of
    the GIL, which the event loop, busy with the next batch's requests, may then hold for up to a
    switch interval while the writer thread waits)."""
    if conn.dialect.name == "postgresql":
        sql = unnest_insert("ssf_derivations", _DERIVED) + _CONFLICT
        driver = await in_transaction(conn)
        if driver is not None:
            await driver.execute(sql, *by_column(rows, len(_DERIVED)))
        else:
            await conn.exec_driver_sql(sql, by_column(rows, len(_DERIVED)))
        return
    for start in range(0, len(rows), _SQLITE_ROWS):  # bound the statement's parameters
        chunk = rows[start : start + _SQLITE_ROWS]
        await conn.exec_driver_sql(_sqlite_insert(len(chunk)), tuple(v for r in chunk for v in r))


#: Rows per SQLite insert: 7 parameters each, far below SQLite's bound on a statement's (32,766).
_SQLITE_ROWS = 512


@functools.lru_cache(maxsize=64)
def _sqlite_insert(count: int) -> str:
    return (
        f"INSERT INTO ssf_derivations ({', '.join(name for name, _ in _DERIVED)}) "  # noqa: S608 - constants
        f"VALUES {values_clause('sqlite', len(_DERIVED), count)}{_CONFLICT}"
    )


class _Observer:
    """:class:`Derivations`' audit sink observer: called in the appending transaction, it indexes
    the issued tokens that rest on another token; ``pg_insert`` gives the same rows as an insert
    to ride in a statement of the caller's (``trustplane.audit.sink.observer_inserts``)."""

    __slots__ = ("_derivations",)

    def __init__(self, derivations: Derivations) -> None:
        self._derivations = derivations

    async def __call__(self, conn: AsyncConnection, events: Sequence[AuditEvent]) -> None:
        rows = [row for e in events if (row := self._derivations._row(e)) is not None]
        if rows:
            await insert_derivations(conn, rows)

    def pg_insert(
        self, events: Sequence[AuditEvent], first: int
    ) -> tuple[str, tuple[list[Any], ...]] | None:
        return self._derivations.pg_insert(events, first)


class Receiver:
    def __init__(
        self,
        db: Database,
        issuer: str,
        partners: PartnerRegistry,
        revoked: RevokedTokens,
        clock_skew: int,
    ) -> None:
        self._db, self._partners, self._revoked = db, partners, revoked
        self.issuer = issuer
        self.endpoint = f"{issuer.rstrip('/')}/ssf/receiver"
        self._skew = clock_skew
        self.received = 0
        #: each partner's transmitter's ``critical_subject_members``, by partner id and profile
        #: version, learned by the subscriber from the transmitter configuration it fetched
        self._critical: dict[str, tuple[int, frozenset[str]]] = {}

    def learn_configuration(self, partner: TrustProfile, config: Any) -> None:
        """The transmitter configuration of ``partner`` (fetched and checked by the subscriber):
        keep its ``critical_subject_members``."""
        self._critical[partner.partner_id] = (partner.version, critical_members(config))

    def _critical_of(self, partner: TrustProfile) -> frozenset[str] | None:
        """None when not learned for this profile version (this process has not subscribed yet)."""
        known = self._critical.get(partner.partner_id)
        return known[1] if known is not None and known[0] == partner.version else None

    async def receive(self, token: str) -> Received:
        """Verify one SET and act on it, or raise :class:`SetRefused`."""
        try:
            partner, claims, typ = await self._partners.verify_signed(token)
        except PartnerTokenError as exc:
            raise _refusal(exc) from None
        if typ != SET_TYPE:
            raise SetRefused("invalid_request", f"the SET's typ must be {SET_TYPE}")
        if partner.ssf_configuration is None:
            raise SetRefused(
                "access_denied", "the partner's trust profile names no shared signals transmitter"
            )
        jti, events = check_set_claims(claims, self.endpoint, self._skew)
        issuer = str(claims["iss"])
        critical = self._critical_of(partner)
        revoked: list[str] = []
        for event_type, body in events.items():
            subject = claims.get("sub_id")
            if subject is None and isinstance(body, dict):
                subject = body.get("subject")  # CAEP drafts put the subject in the event
            check_critical_members(subject, critical)
            if event_type not in ACTED_ON:
                continue  # verification, stream-updated and others: accepted, nothing to do
            if restores(event_type, body):
                continue  # a resumed mandate: nothing derived from it needs to go
            revoked.extend(await self._revoke(issuer, subject))
        self.received += 1
        log.info(
            "ssf_set_received",
            jti=jti[:64],
            partner=partner.partner_id,
            events=sorted(events)[:8],
            revoked=len(revoked),
        )
        return Received(jti, partner.partner_id, tuple(events), tuple(revoked))

    async def _revoke(self, issuer: str, subject: Any) -> list[str]:
        if not isinstance(subject, dict):
            raise SetRefused("invalid_request", "the event has no subject (sub_id)")
        fmt = subject.get("format")
        session = subject.get("session")
        if fmt == "complex" and isinstance(session, dict) and session.get("format") == "opaque":
            # a mandate event (RFC 9493 complex subject, the mandate as the session): mandate ids
            # are the transmitter's own, so the SET's iss scopes them
            key, column = session.get("id"), ssf_derivations.c.origin_mandate
        elif fmt in ("jwt_id", "iss_sub"):
            if subject.get("iss") != issuer:
                raise SetRefused(
                    "access_denied", "a transmitter may only signal about its own issuer's subjects"
                )
            key = subject.get("jti") if fmt == "jwt_id" else subject.get("sub")
            column = (
                ssf_derivations.c.origin_jti if fmt == "jwt_id" else ssf_derivations.c.origin_sub
            )
        else:
            return []  # a subject format we index nothing by: accepted, nothing matches
        if not isinstance(key, str) or not key:
            raise SetRefused("invalid_request", f"a {fmt} subject needs its identifier")
        async with self._db.transaction() as conn:
            rows = (
                await conn.execute(
                    select(ssf_derivations).where(
                        ssf_derivations.c.origin_iss == issuer, column == key
                    )
                )
            ).all()
            following = _FOLLOWING.set(True)
            try:
                return [row.jti for row in await self._follow(conn, rows)]
            finally:
                _FOLLOWING.reset(following)

    async def on_revoked(self, conn: AsyncConnection, jti: str, client_id: str, exp: int) -> None:
        """The revocation hook (``RevokedTokens.observers``), in the revoking transaction: one of
        our tokens was revoked here (``POST /revoke``, a reused code or refresh token), so every
        token exchanged here from it, and from those in turn, is revoked with it, each with its
        ledger entry. Without this, RFC 7009 revocation of a subject token left the tokens derived
        from it active until their expiry. A revocation made while a cascade is being followed
        starts none of its own (the outer one reaches its derivations)."""
        if _FOLLOWING.get():
            return
        following = _FOLLOWING.set(True)
        try:
            derived = await self._follow(conn, await self._derived_from(conn, [jti]))
            if derived:
                await write_events(conn, [self._cascade_event(jti, row) for row in derived])
                log.info("ssf_derived_tokens_revoked", jti=jti[:64], revoked=len(derived))
        finally:
            _FOLLOWING.reset(following)

    async def _derived_from(self, conn: AsyncConnection, jtis: list[str]) -> Sequence[Any]:
        """The index rows of the tokens exchanged here from ``jtis`` (our own tokens)."""
        return (
            await conn.execute(
                select(ssf_derivations).where(
                    ssf_derivations.c.origin_iss == self.issuer,
                    ssf_derivations.c.origin_jti.in_(jtis),
                )
            )
        ).all()

    async def _follow(self, conn: AsyncConnection, rows: Sequence[Any]) -> list[Any]:
        """Revoke the tokens of ``rows`` (those not expired) and, level by level, the tokens
        exchanged here from them, :data:`MAX_CHAIN` levels deep; the index row of every token
        reached, in the order reached."""
        now, revoked, depth = int(time.time()), [], 0
        while rows and depth < MAX_CHAIN:
            for row in rows:
                if row.expires_at >= now:
                    await self._revoked.revoke(conn, row.jti, row.client_id, row.expires_at)
                revoked.append(row)
            rows = await self._derived_from(conn, [r.jti for r in rows])
            depth += 1
        return revoked

    def _cascade_event(self, root: str, row: Any) -> AuditEvent:
        """The ledger entry of a token revoked because the token it was exchanged from was: its
        own ``jti`` and client, the token it came from and the revocation that started it."""
        return AuditEvent(
            type=AuditEventType.TOKEN_REVOKED,
            issuer=self.issuer,
            client_id=row.client_id,
            jti=row.jti,
            reason="derived_from_revoked",
            service="trustplane.ssf",
            payload={"exp": row.expires_at, "derived_from": row.origin_jti, "revoked_with": root},
        )


def check_set_claims(
    claims: dict[str, Any], audience: str, skew: int
) -> tuple[str, dict[str, Any]]:
    """The claims every SET we act on must have (RFC 8417 §2.2, SSF 1.0 §10), after its signature
    verified: ``aud`` names ``audience``, ``jti``, a non-empty ``events`` object, ``iat`` not in
    the future beyond ``skew`` seconds, no ``exp`` and no ``sub`` (SSF 1.0, "Distinguishing SETs
    from other Kinds of JWTs"). Returns (jti, events) or raises
    :class:`SetRefused`. Also used by the reference services' poll receiver."""
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in audiences:
        raise SetRefused("invalid_audience", "the SET is not addressed to this receiver")
    jti, events, iat = claims.get("jti"), claims.get("events"), claims.get("iat")
    if not isinstance(jti, str) or not jti or not isinstance(events, dict) or not events:
        raise SetRefused("invalid_request", "a SET needs jti and a non-empty events object")
    if not isinstance(iat, int) or iat > int(time.time()) + skew:
        raise SetRefused("invalid_request", "iat is missing or in the future")
    if "exp" in claims:  # SSF 1.0 "The exp Claim": MUST NOT be used in SETs
        raise SetRefused("invalid_request", "a SET must not carry exp")
    if "sub" in claims:  # SSF 1.0 "SSF Event Subject": sub MUST NOT be present
        raise SetRefused("invalid_request", "a SET must not carry sub (its subject is sub_id)")
    return jti, events


def critical_members(config: Any) -> frozenset[str]:
    """A transmitter configuration's ``critical_subject_members`` (SSF 1.0 §7.1: the members of
    a complex subject a receiver MUST interpret); empty if absent. A malformed value counts as
    "every member critical" (``*``): what cannot be read is not taken to allow anything."""
    names = config.get("critical_subject_members") if isinstance(config, dict) else None
    if names is None:
        return frozenset()
    if (
        not isinstance(names, list)
        or len(names) > MAX_CRITICAL_MEMBERS
        or not all(isinstance(n, str) and 0 < len(n) <= MAX_MEMBER_NAME for n in names)
    ):
        return frozenset({"*"})
    return frozenset(names)


def check_critical_members(subject: Any, critical: frozenset[str] | None) -> None:
    """SSF 1.0 "Receiver Subject Processing": a receiver MUST discard an event whose subject has a
    critical member it is unable to process. The one complex-subject member we process is an
    ``opaque`` ``session`` (a mandate); any other member present and critical, or any member but
    that one when the transmitter's ``critical_subject_members`` are not known (``critical``
    None), refuses the SET (RFC 8935 §2.4 has no closer code than ``invalid_request``: the event
    does not conform to what this receiver can act on)."""
    if not isinstance(subject, dict) or subject.get("format") != "complex":
        return
    session = subject.get("session")
    understood = {"format"}
    if isinstance(session, dict) and session.get("format") == "opaque":
        understood.add("session")
    for member in subject:
        if member in understood:
            continue
        if critical is None or "*" in critical or member in critical:
            raise SetRefused(
                "invalid_request",
                f"the subject's critical member {member[:MAX_MEMBER_NAME]!r} cannot be processed"
                " by this receiver",
            )


def restores(event_type: str, body: Any) -> bool:
    """A ``token-claims-change`` saying the mandate is active again (resumed) takes nothing away."""
    if event_type != TOKEN_CLAIMS_CHANGE or not isinstance(body, dict):
        return False
    claims = body.get("claims")
    return isinstance(claims, dict) and claims.get("mandate_status") == "active"


def _refusal(exc: PartnerTokenError) -> SetRefused:
    reason = exc.reason_id
    if reason in ("untrusted_issuer", "partner_disabled"):
        return SetRefused("invalid_issuer", str(exc))
    if reason in ("signature", "algorithm", "key_in_header"):
        return SetRefused("invalid_key", str(exc))
    return SetRefused("invalid_request", str(exc))
