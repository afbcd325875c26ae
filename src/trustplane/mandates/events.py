"""Security events about mandates: RFC 8417 Security Event Tokens in the OpenID CAEP shapes, signed
with the authorization server's active key, written to the ``security_events`` outbox in the same
transaction as the change, then published to NATS JetStream when ``TRUSTPLANE_NATS_URL`` is set.

* revocation  -> ``session-revoked`` (the delegated authority the mandate is ends for good);
* suspension, resumption, amendment -> ``token-claims-change`` with the changed ``mandate_status``
  / ``mandate_version`` claims.

The subject is an RFC 9493 ``complex`` identifier: the mandate as the ``session``, the grantee client
as the ``application``, the grantor LEI as the ``tenant`` and the granting person as the ``user``.
Publication is at least once: a row is marked published only after JetStream acknowledged it, and
the JetStream ``Nats-Msg-Id`` header (the SET's ``jti``) lets the stream drop duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane import metrics
from trustplane.ids import new_jti
from trustplane.jose.jws import Signer
from trustplane.keys.service import KeyService
from trustplane.mandates.model import Mandate
from trustplane.mandates.tables import security_events
from trustplane.settings import Settings
from trustplane.storage.db import Database

log = structlog.get_logger("trustplane.mandates")
CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
SESSION_REVOKED = CAEP + "session-revoked"
TOKEN_CLAIMS_CHANGE = CAEP + "token-claims-change"
SET_TYP = "secevent+jwt"
PUBLISH_BATCH = 100
#: Called in the change's transaction with (conn, event type, the signed SET): the shared-signals
#: transmitter (trustplane.ssf) relays mandate events to its streams from there.
EventObserver = Callable[[AsyncConnection, str, str], Awaitable[None]]


def subject(mandate: Mandate) -> dict[str, Any]:
    sub: dict[str, Any] = {
        "format": "complex",
        "session": {"format": "opaque", "id": mandate.id},
        "application": {"format": "opaque", "id": mandate.grantee_client_id},
        "tenant": {"format": "opaque", "id": mandate.grantor_lei},
    }
    if mandate.grantor_person:
        sub["user"] = {"format": "opaque", "id": mandate.grantor_person}
    return sub


class SecurityEvents:
    """Builds, signs and stores SETs; publishes the stored ones."""

    def __init__(self, settings: Settings, keys: KeyService, publisher: NatsPublisher | None):
        self._settings, self._keys, self.publisher = settings, keys, publisher
        self._signer: tuple[Signer, Signer] | None = None  # (token signer, its SET twin)
        self.observers: list[EventObserver] = []

    def build(
        self,
        mandate: Mandate,
        event_type: str,
        *,
        initiator: str,
        reason: str | None,
        claims: dict[str, Any] | None = None,
        now: int | None = None,
    ) -> tuple[str, str]:
        """Return ``(jti, compact SET)``."""
        issued = int(time.time()) if now is None else now
        event: dict[str, Any] = {"event_timestamp": issued, "initiating_entity": initiator}
        if reason:
            event["reason_admin"] = {"en": reason[:500]}
        if claims is not None:
            event["claims"] = claims
        jti = new_jti()
        payload: dict[str, Any] = {
            "iss": self._settings.issuer,
            "iat": issued,
            "jti": jti,
            "sub_id": subject(mandate),
            "mandate": mandate.ref,
            "events": {event_type: event},
        }
        if self._settings.security_event_audience:
            audience = list(self._settings.security_event_audience)
            payload["aud"] = audience[0] if len(audience) == 1 else audience
        return jti, self._set_signer().sign(payload)

    def _set_signer(self) -> Signer:
        current = self._keys.ring.require_signer()
        if self._signer is None or self._signer[0] is not current:
            self._signer = (current, current.with_typ(SET_TYP))
        return self._signer[1]

    async def record(
        self, conn: AsyncConnection, mandate: Mandate, event_type: str, jti: str, token: str
    ) -> None:
        await conn.execute(
            insert(security_events).values(
                jti=jti,
                event_type=event_type,
                mandate_id=mandate.id,
                mandate_version=mandate.version,
                token=token,
                created_at=int(time.time()),
            )
        )
        metrics.SECURITY_EVENTS.labels(outcome="stored").inc()
        for observer in self.observers:
            await observer(conn, event_type, token)

    async def publish_pending(self, db: Database) -> int:
        """Publish unpublished SETs in order; returns how many were acknowledged. A failure stops the
        batch (kept for the next call: maintenance retries every minute)."""
        if self.publisher is None:
            return 0
        async with db.read() as conn:
            rows = (
                await conn.execute(
                    select(
                        security_events.c.seq,
                        security_events.c.jti,
                        security_events.c.event_type,
                        security_events.c.token,
                    )
                    .where(security_events.c.published_at.is_(None))
                    .order_by(security_events.c.seq)
                    .limit(PUBLISH_BATCH)
                )
            ).all()
        done = 0
        for seq, jti, event_type, token in rows:
            try:
                await self.publisher.publish(event_type, jti, token)
            except Exception as exc:  # NATS down: keep the row, try again later
                metrics.SECURITY_EVENTS.labels(outcome="publish_failed").inc()
                log.warning("security_event_publish_failed", jti=jti, error=repr(exc))
                break
            async with db.transaction() as conn:
                await conn.execute(
                    update(security_events)
                    .where(security_events.c.seq == seq)
                    .values(published_at=int(time.time()))
                )
            metrics.SECURITY_EVENTS.labels(outcome="published").inc()
            done += 1
        return done

    async def aclose(self) -> None:
        if self.publisher is not None:
            await self.publisher.aclose()


class NatsPublisher:
    """JetStream publisher; connects on first use and creates the stream if it does not exist.

    Subject: ``{nats_subject}.{event name}`` (``...session-revoked``, ``...token-claims-change``).
    """

    def __init__(self, url: str, stream: str, subject_prefix: str) -> None:
        self.url, self.stream, self.prefix = url, stream, subject_prefix
        self._nc: Any = None
        self._js: Any = None

    def subject_for(self, event_type: str) -> str:
        return f"{self.prefix}.{event_type.rsplit('/', 1)[-1]}"

    async def _jetstream(self) -> Any:
        if self._js is None:
            import nats
            from nats.js.errors import NotFoundError

            self._nc = await nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=2)
            js = self._nc.jetstream()
            try:
                await js.stream_info(self.stream)
            except NotFoundError:
                await js.add_stream(name=self.stream, subjects=[f"{self.prefix}.>"])
            self._js = js
        return self._js

    async def publish(self, event_type: str, jti: str, token: str) -> None:
        js = await self._jetstream()
        await js.publish(
            self.subject_for(event_type),
            token.encode("ascii"),
            timeout=5,
            headers={"Nats-Msg-Id": jti, "Content-Type": "application/secevent+jwt"},
        )

    async def aclose(self) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc, self._js = None, None
