"""The SSF 1.0 transmitter: streams, Security Event Tokens (RFC 8417) about our tokens, and their
delivery by push (RFC 8935) or poll (RFC 8936).

A revocation of one of our access tokens (``POST /revoke``, a reused code or refresh token, or the
receiver revoking a derived token) calls :meth:`Transmitter.on_revoked` inside the revoking
transaction: one signed CAEP ``session-revoked`` SET per enabled or paused stream goes into the
outbox with the revocation, so a committed revocation always has its events and a rolled-back one
has none. The push deliverer takes due rows (a conditional update claims a row for
``CLAIM_LEASE_MS``, so several processes never post the same row at once), posts them, deletes them
on 202, and otherwise retries with exponential backoff: nothing is dropped while the receiver is
down. A poll stream keeps its SETs until the receiver acknowledges them (``ack`` or ``setErrs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import structlog
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.jose.jws import parse
from trustplane.keys.service import KeyService
from trustplane.outbound import OutboundError, OutboundFetcher
from trustplane.settings import Settings
from trustplane.ssf.tables import ssf_outbox, ssf_streams
from trustplane.storage.db import Database
from trustplane.storage.notify import GenerationListener

log = structlog.get_logger("trustplane.ssf")

SET_TYPE = "secevent+jwt"
PUSH = "urn:ietf:rfc:8935"
POLL = "urn:ietf:rfc:8936"
CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
SSF = "https://schemas.openid.net/secevent/ssf/event-type/"
SESSION_REVOKED = CAEP + "session-revoked"
TOKEN_CLAIMS_CHANGE = CAEP + "token-claims-change"
VERIFICATION = SSF + "verification"
STREAM_UPDATED = SSF + "stream-updated"
#: What a stream can ask for (verification and stream-updated are always delivered, SSF 1.0 §8.1.4).
EVENTS_SUPPORTED = (SESSION_REVOKED, TOKEN_CLAIMS_CHANGE)
ALWAYS_DELIVERED = (VERIFICATION, STREAM_UPDATED)
STATUSES = ("enabled", "paused", "disabled")
MAX_STREAMS_PER_CLIENT = 10
#: First key of the PostgreSQL advisory lock that serialises one client's stream creations ("ssf1").
STREAM_CREATION_LOCK = 0x73736631
MAX_DESCRIPTION = 256
MAX_EVENTS = 1000
CLAIM_LEASE_MS = 30_000
PUSH_BATCH = 100
#: ``next_attempt_ms`` of a SET queued for a poll stream (RFC 8936): never due for the push
#: deliverer, which reads the due rows in id order, ``PUSH_BATCH`` at a time. Queued at 0 like a
#: push SET, a poll stream's unacknowledged SETs were the first due rows of every round, and once a
#: receiver left ``PUSH_BATCH`` of them unpolled no push SET behind them was ever delivered.
POLLED = 2**63 - 1
#: After a wake: look at once, then again after these pauses until something was due (seconds).
WAKE_RETRIES = (0.0, 0.005, 0.01, 0.02, 0.04, 0.08)
#: PostgreSQL: a queued SET is announced on this channel, delivered to every process's deliverer
#: when the queuing transaction commits.
CHANNEL = "trustplane_ssf_outbox"
#: Seconds between two looks at the outbox while the announcements are heard (the fallback for a
#: lost one, or a claim left by a crashed process); else ``ssf_push_interval``.
NOTIFIED_FALLBACK = 5.0


#: A stream id we may have issued (``secrets.token_urlsafe``: RFC 3986 unreserved characters, as
#: SSF 1.0 §8.1.1 recommends). Any other string names no stream and is answered 404 before it
#: reaches a query: a NUL made PostgreSQL refuse the comparison, and every endpoint answered 500.
STREAM_ID = re.compile(r"[A-Za-z0-9._~-]{1,64}")
#: A jti an ``ack`` or ``setErrs`` member can name (ours are 32 hex digits): anything else names no
#: SET and is ignored (a NUL made the poll's delete fail with 500 on PostgreSQL).
SET_JTI = re.compile(r"[\x21-\x7e]{1,64}")
MAX_ENDPOINT_URL = 2048
#: Members of a stream's configuration that the transmitter supplies (SSF 1.0 §8.1.1): a PATCH or
#: PUT may carry them, but each MUST match its value before the update (§8.1.1.3, §8.1.1.4).
TRANSMITTER_SUPPLIED = (
    "iss",
    "aud",
    "events_supported",
    "events_delivered",
    "min_verification_interval",
)
_MISSING: Any = object()


class StreamError(ValueError):
    """A stream request the transmitter refuses (400 invalid_request)."""


class StreamNotFoundError(LookupError):
    """No such stream for this client (404 not_found; another client's stream is not revealed)."""


class StreamConflictError(StreamError):
    """The client has as many streams as it may have (SSF 1.0 §8.1.1.1: 409 Conflict)."""


@dataclass(frozen=True, slots=True)
class Stream:
    stream_id: str
    client_id: str
    config: dict[str, Any]
    status: str
    reason: str | None

    @property
    def method(self) -> str:
        return str(self.config["delivery"]["method"])

    def delivers(self, event_type: str) -> bool:
        return event_type in ALWAYS_DELIVERED or event_type in self.config["events_delivered"]


async def _serialise_creations(conn: AsyncConnection, client_id: str) -> None:
    """Make this transaction the client's only stream creation until it ends, so that the count
    after its insert sees every stream committed before (SSF 1.0 §8.1.1.1: the cap holds under
    racing creations; a count before the insert let them all see the same streams and pass).
    PostgreSQL: a transaction-level advisory lock on the client (two-key form, its own key space:
    :data:`STREAM_CREATION_LOCK` and the client id's hash; two clients sharing a hash only wait
    for each other). SQLite: nothing to take here: the insert, the transaction's first statement,
    takes the database's one write lock until the commit, and the count then reads the latest
    snapshot."""
    if conn.dialect.name == "postgresql":
        await conn.execute(
            select(func.pg_advisory_xact_lock(STREAM_CREATION_LOCK, func.hashtext(client_id)))
        )


def _stream(row: Any) -> Stream:
    return Stream(row.stream_id, row.client_id, orjson.loads(row.config), row.status, row.reason)


class Transmitter:
    def __init__(
        self, settings: Settings, db: Database, keys: KeyService, fetcher: OutboundFetcher
    ) -> None:
        self._settings, self._db, self._keys, self._fetcher = settings, db, keys, fetcher
        self.issuer = settings.issuer
        self.wake = asyncio.Event()
        #: SETs accepted by push receivers, and failed attempts, since start (this process)
        self.pushed = 0
        self.failed_pushes = 0

    # ------------------------------------------------------------------ metadata

    def configuration(self) -> dict[str, Any]:
        """``/.well-known/ssf-configuration`` (SSF 1.0 §7.1)."""
        base = self.issuer.rstrip("/")
        return {
            "spec_version": "1_0",
            "issuer": self.issuer,
            "jwks_uri": f"{base}/jwks",
            "delivery_methods_supported": [PUSH, POLL],
            "configuration_endpoint": f"{base}/ssf/stream",
            "status_endpoint": f"{base}/ssf/status",
            "verification_endpoint": f"{base}/ssf/verify",
            "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6749"}],
            "default_subjects": "ALL",
        }

    # ------------------------------------------------------------------ stream management

    async def create(self, client_id: str, body: Any) -> dict[str, Any]:
        request = _object(body)
        delivery = self._delivery(request.get("delivery", _MISSING), None)
        stream_id = secrets.token_urlsafe(16)
        config = self._config(stream_id, client_id, request, delivery)
        now = int(time.time())
        async with self._db.transaction() as conn:
            await _serialise_creations(conn, client_id)
            await conn.execute(
                ssf_streams.insert().values(
                    stream_id=stream_id,
                    client_id=client_id,
                    config=orjson.dumps(config).decode(),
                    status="enabled",
                    reason=None,
                    created_at=now,
                    updated_at=now,
                )
            )
            # counted after the insert, under the lock: the new stream and every one committed
            # before it; over the cap, the transaction rolls back and nothing was written
            count = await conn.scalar(
                select(func.count())
                .select_from(ssf_streams)
                .where(ssf_streams.c.client_id == client_id)
            )
            if (count or 0) > MAX_STREAMS_PER_CLIENT:
                raise StreamConflictError(
                    f"a client may have at most {MAX_STREAMS_PER_CLIENT} streams: update or"
                    " delete one of them"
                )
        log.info("ssf_stream_created", stream_id=stream_id, client_id=client_id)
        return config

    async def read(self, client_id: str, stream_id: str | None) -> list[dict[str, Any]]:
        async with self._db.read() as conn:
            query = select(ssf_streams).where(ssf_streams.c.client_id == client_id)
            if stream_id is not None:
                query = query.where(ssf_streams.c.stream_id == _stream_id(stream_id))
            rows = (await conn.execute(query.order_by(ssf_streams.c.created_at))).all()
        if stream_id is not None and not rows:
            raise StreamNotFoundError(stream_id)
        return [_stream(r).config for r in rows]

    async def update(self, client_id: str, body: Any, *, replace: bool) -> dict[str, Any]:
        """PATCH (``replace`` False: only the receiver-supplied members given) or PUT (all of them;
        an omitted optional member goes back to its default). Transmitter-supplied members may be
        present but must match (SSF 1.0 §8.1.1.3-4). Everything is checked before the one update,
        in one transaction: a refused request leaves the stream and its queue as they were."""
        request = _object(body)
        stream_id = _stream_id(request.get("stream_id"))
        async with self._db.transaction() as conn:
            stream = await self._owned(conn, client_id, stream_id, lock=True)
            self._check_supplied(request, stream)
            merged = dict(request) if replace else {**stream.config, **request}
            delivery = self._delivery(merged.get("delivery", _MISSING), stream)
            config = self._config(stream_id, client_id, merged, delivery)
            await conn.execute(
                update(ssf_streams)
                .where(ssf_streams.c.stream_id == stream_id)
                .values(config=orjson.dumps(config).decode(), updated_at=int(time.time()))
            )
            if delivery["method"] != stream.method:  # queued SETs were for the other method
                await conn.execute(delete(ssf_outbox).where(ssf_outbox.c.stream_id == stream_id))
        return config

    async def delete(self, client_id: str, stream_id: str | None) -> None:
        sid = _stream_id(stream_id)
        async with self._db.transaction() as conn:
            await self._owned(conn, client_id, sid, lock=True)
            await conn.execute(delete(ssf_outbox).where(ssf_outbox.c.stream_id == sid))
            await conn.execute(delete(ssf_streams).where(ssf_streams.c.stream_id == sid))
        log.info("ssf_stream_deleted", stream_id=sid, client_id=client_id)

    async def status(self, client_id: str, stream_id: str | None) -> dict[str, Any]:
        sid = _stream_id(stream_id)
        async with self._db.read() as conn:
            stream = await self._owned(conn, client_id, sid)
        return _status_body(stream)

    async def set_status(self, client_id: str, body: Any) -> dict[str, Any]:
        """SSF 1.0 §8.1.2.2; a change is announced by a ``stream-updated`` SET. Disabling drops
        what was queued (a disabled stream holds nothing, §8.1.2); pausing keeps it."""
        request = _object(body)
        sid = _stream_id(request.get("stream_id"))
        status = request.get("status")
        if status not in STATUSES:
            raise StreamError(f"status must be one of {', '.join(STATUSES)}")
        reason = _text(request.get("reason"), "reason")
        async with self._db.transaction() as conn:
            stream = await self._owned(conn, client_id, sid, lock=True)
            await conn.execute(
                update(ssf_streams)
                .where(ssf_streams.c.stream_id == sid)
                .values(status=status, reason=reason, updated_at=int(time.time()))
            )
            if status == "disabled":
                await conn.execute(delete(ssf_outbox).where(ssf_outbox.c.stream_id == sid))
            changed = Stream(sid, client_id, stream.config, status, reason)
            if status != stream.status and status != "disabled":
                payload: dict[str, Any] = {"status": status}
                if reason is not None:
                    payload["reason"] = reason
                await self._enqueue(conn, changed, STREAM_UPDATED, payload, _stream_subject(sid))
        self.wake.set()
        return _status_body(changed)

    async def verify(self, client_id: str, body: Any) -> None:
        """SSF 1.0 §8.1.4.2: queue a verification SET carrying the receiver's ``state``."""
        request = _object(body)
        sid = _stream_id(request.get("stream_id"))
        state = _text(request.get("state"), "state")
        async with self._db.transaction() as conn:
            stream = await self._owned(conn, client_id, sid)
            if stream.status == "disabled":
                raise StreamError("the stream is disabled")
            payload = {"state": state} if state is not None else {}
            await self._enqueue(conn, stream, VERIFICATION, payload, _stream_subject(sid))
        self.wake.set()

    # ------------------------------------------------------------------ emission

    async def on_revoked(self, conn: AsyncConnection, jti: str, client_id: str, exp: int) -> None:
        """The revocation hook (``RevokedTokens.observers``): in the revoking transaction."""
        rows = await conn.execute(select(ssf_streams).where(ssf_streams.c.status != "disabled"))
        subject = {"format": "jwt_id", "iss": self.issuer, "jti": jti}
        payload = {
            "event_timestamp": int(time.time()),
            "initiating_entity": "policy",
            "reason_admin": {"en": "access token revoked"},
        }
        queued = 0
        for row in rows.all():
            stream = _stream(row)
            if stream.delivers(SESSION_REVOKED):
                await self._enqueue(conn, stream, SESSION_REVOKED, payload, subject)
                queued += 1
        if queued:
            self.wake.set()

    async def on_mandate_event(self, conn: AsyncConnection, event_type: str, token: str) -> None:
        """The mandates' security-event observer (``SecurityEvents.observers``), in the change's
        transaction: the CAEP event about a mandate (revoked: ``session-revoked``; suspended,
        resumed, amended, expired: ``token-claims-change``) goes to every stream that asked for
        it, re-signed for the stream's audience, with the same subject and event body."""
        set_claims = parse(token).claims()  # signed by us a moment ago
        body = set_claims.get("events", {}).get(event_type)
        if not isinstance(body, dict):
            return
        extra = {"mandate": set_claims["mandate"]} if "mandate" in set_claims else {}
        rows = await conn.execute(select(ssf_streams).where(ssf_streams.c.status != "disabled"))
        queued = 0
        for row in rows.all():
            stream = _stream(row)
            if stream.delivers(event_type):
                await self._enqueue(conn, stream, event_type, body, set_claims["sub_id"], extra)
                queued += 1
        if queued:
            self.wake.set()

    async def _enqueue(
        self,
        conn: AsyncConnection,
        stream: Stream,
        event_type: str,
        payload: Mapping[str, Any],
        subject: dict[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        jti = secrets.token_hex(16)
        claims = {
            "iss": self.issuer,
            "aud": stream.config["aud"],
            "iat": now,
            "jti": jti,
            "sub_id": subject,
            "events": {event_type: dict(payload)},
            **(extra or {}),
        }
        token = self._keys.ring.require_signer().with_typ(SET_TYPE).sign(claims)
        await conn.execute(
            ssf_outbox.insert().values(
                stream_id=stream.stream_id,
                jti=jti,
                token=token,
                created_at=now,
                attempts=0,
                next_attempt_ms=0 if stream.method == PUSH else POLLED,
                last_error=None,
            )
        )
        if conn.dialect.name == "postgresql":  # every process's deliverer, at the commit
            await conn.execute(select(func.pg_notify(CHANNEL, "")))
        return jti

    # ------------------------------------------------------------------ push (RFC 8935)

    async def run(self, stopping: asyncio.Event) -> None:
        """The push deliverer: when a SET was queued here, or (PostgreSQL) announced by any
        process at its commit, and when a retry falls due; besides, every ``ssf_push_interval``
        (every :data:`NOTIFIED_FALLBACK` seconds while the announcements are heard)."""
        listener = (
            None if self._db.is_sqlite else GenerationListener(self._db.url, CHANNEL, self.wake)
        )
        listening = asyncio.create_task(listener.run(stopping)) if listener is not None else None
        try:
            while not stopping.is_set():
                interval = self._settings.ssf_push_interval
                if listener is not None and listener.connected.is_set():
                    interval = max(interval, NOTIFIED_FALLBACK)
                woken = False
                with contextlib.suppress(TimeoutError):
                    woken = await asyncio.wait_for(self.wake.wait(), interval)
                self.wake.clear()
                if stopping.is_set():
                    return
                # A wake comes from inside the queuing transaction, before its commit: if the
                # round finds nothing yet, look again shortly rather than a whole interval later.
                for pause in WAKE_RETRIES if woken else (0.0,):
                    await asyncio.sleep(pause)
                    try:
                        if await self.deliver_due():
                            break
                    except Exception as exc:  # logged; the rows stay and are retried
                        log.error("ssf_push_round_failed", error=repr(exc))
                        break
        finally:
            if listening is not None:
                listening.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listening

    async def deliver_due(self) -> int:
        """Post every due SET of an enabled push stream once; returns how many it attempted."""
        now_ms = int(time.time() * 1000)
        async with self._db.read() as conn:
            rows = (
                await conn.execute(
                    select(ssf_outbox, ssf_streams.c.config)
                    .join(ssf_streams, ssf_streams.c.stream_id == ssf_outbox.c.stream_id)
                    .where(
                        ssf_streams.c.status == "enabled",
                        ssf_outbox.c.next_attempt_ms <= now_ms,
                    )
                    .order_by(ssf_outbox.c.id)
                    .limit(PUSH_BATCH)
                )
            ).all()
        attempted = 0
        for row in rows:
            config = orjson.loads(row.config)
            if config["delivery"]["method"] != PUSH:
                continue
            if not await self._claim(row.id, row.next_attempt_ms, now_ms):
                continue  # another process has it
            await self._push(row, config["delivery"])
            attempted += 1
        return attempted

    async def _claim(self, row_id: int, seen: int, now_ms: int) -> bool:
        async with self._db.transaction() as conn:
            result = await conn.execute(
                update(ssf_outbox)
                .where(ssf_outbox.c.id == row_id, ssf_outbox.c.next_attempt_ms == seen)
                .values(next_attempt_ms=now_ms + CLAIM_LEASE_MS)
            )
        return bool(result.rowcount == 1)

    async def _push(self, row: Any, delivery: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/secevent+jwt", "Accept": "application/json"}
        if delivery.get("authorization_header"):
            headers["Authorization"] = str(delivery["authorization_header"])
        try:
            answer = await self._fetcher.request(
                "POST",
                delivery["endpoint_url"],
                purpose="ssf_push",
                headers=headers,
                content=row.token.encode(),
            )
        except OutboundError as exc:
            await self._retry(row, f"{exc.outcome}: {exc.reason}")
            return
        if answer.status == 202:
            async with self._db.transaction() as conn:
                await conn.execute(delete(ssf_outbox).where(ssf_outbox.c.id == row.id))
            self.pushed += 1
            return
        if answer.status == 400:
            # RFC 8935 §2.3: the receiver refused this SET for good (bad issuer, audience, key...);
            # sending it again cannot change that. Logged with the receiver's error code.
            err = _push_error(answer.body)
            log.warning("ssf_push_refused", jti=row.jti, stream_id=row.stream_id, err=err)
            async with self._db.transaction() as conn:
                await conn.execute(delete(ssf_outbox).where(ssf_outbox.c.id == row.id))
            self.failed_pushes += 1
            return
        await self._retry(row, f"HTTP {answer.status}")

    async def _retry(self, row: Any, error: str) -> None:
        attempts = int(row.attempts) + 1
        delay = min(
            self._settings.ssf_retry_base * (2 ** (attempts - 1)), self._settings.ssf_retry_max
        )
        async with self._db.transaction() as conn:
            await conn.execute(
                update(ssf_outbox)
                .where(ssf_outbox.c.id == row.id)
                .values(
                    attempts=attempts,
                    next_attempt_ms=int((time.time() + delay) * 1000),
                    last_error=error[:512],
                )
            )
        self.failed_pushes += 1
        asyncio.get_running_loop().call_later(delay, self.wake.set)  # not a poll's worth later
        log.info("ssf_push_retry", jti=row.jti, attempts=attempts, delay=delay, error=error[:200])

    # ------------------------------------------------------------------ poll (RFC 8936)

    async def poll(self, client_id: str, stream_id: str, body: Any) -> dict[str, Any]:
        request = _object(body)
        max_events = request.get("maxEvents", PUSH_BATCH)
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 0:
            raise StreamError("maxEvents must be a non-negative integer")
        immediately = request.get("returnImmediately", False)
        if not isinstance(immediately, bool):
            raise StreamError("returnImmediately must be a boolean")
        acks = request.get("ack", [])
        if not isinstance(acks, list) or not all(isinstance(a, str) for a in acks):
            raise StreamError("ack must be an array of SET jti strings")
        errs = request.get("setErrs", {})
        if not isinstance(errs, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("err"), str) for v in errs.values()
        ):
            raise StreamError('setErrs must map SET jtis to {"err", "description"} objects')
        # a jti we cannot have issued names no SET: ignored, like any unknown one (RFC 8936 §2.2)
        done = [jti for jti in (*acks, *errs) if SET_JTI.fullmatch(jti)]
        stream_id = _stream_id(stream_id)
        async with self._db.transaction() as conn:
            stream = await self._owned(conn, client_id, stream_id)
            if stream.method != POLL:
                raise StreamError("this stream is delivered by push, not poll")
            if done:
                await conn.execute(
                    delete(ssf_outbox).where(
                        ssf_outbox.c.stream_id == stream_id, ssf_outbox.c.jti.in_(done)
                    )
                )
        for jti, err in errs.items():
            log.warning("ssf_poll_set_error", jti=jti[:64], err=str(err["err"])[:64])
        limit = min(max_events, MAX_EVENTS)
        deadline = time.monotonic() + (0 if immediately else self._settings.ssf_poll_wait)
        while True:
            sets, more = await self._queued(stream_id, limit)
            if sets or limit == 0 or time.monotonic() >= deadline:
                return {"sets": sets, "moreAvailable": more}
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def _queued(self, stream_id: str, limit: int) -> tuple[dict[str, str], bool]:
        if limit == 0:
            return {}, False
        async with self._db.read() as conn:
            rows = (
                await conn.execute(
                    select(ssf_outbox.c.jti, ssf_outbox.c.token)
                    .join(ssf_streams, ssf_streams.c.stream_id == ssf_outbox.c.stream_id)
                    .where(ssf_outbox.c.stream_id == stream_id, ssf_streams.c.status == "enabled")
                    .order_by(ssf_outbox.c.id)
                    .limit(limit + 1)
                )
            ).all()
        return {r.jti: r.token for r in rows[:limit]}, len(rows) > limit

    # ------------------------------------------------------------------ helpers

    async def _owned(
        self, conn: AsyncConnection, client_id: str, stream_id: str, *, lock: bool = False
    ) -> Stream:
        query = select(ssf_streams).where(
            ssf_streams.c.stream_id == stream_id, ssf_streams.c.client_id == client_id
        )
        if lock and conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = (await conn.execute(query)).first()
        if row is None:
            raise StreamNotFoundError(stream_id)
        return _stream(row)

    def _check_supplied(self, request: dict[str, Any], stream: Stream) -> None:
        """SSF 1.0 §8.1.1.3-4: a transmitter-supplied member in a PATCH or PUT MUST match its
        value before the update (they were ignored: a receiver believed it had changed them)."""
        for name in TRANSMITTER_SUPPLIED:
            if name in request and not _same(request[name], stream.config.get(name)):
                raise StreamError(f"{name} is supplied by the transmitter and does not match")

    def _delivery(self, raw: Any, stream: Stream | None) -> dict[str, Any]:
        """``raw`` is ``_MISSING`` when the request has no ``delivery``: poll (SSF 1.0 §8.1.1.1).
        A poll ``endpoint_url`` is ours: in an update, one that is given must be the stream's."""
        if raw is _MISSING:
            raw = {"method": POLL}
        if not isinstance(raw, dict):
            raise StreamError("delivery must be an object")
        method = raw.get("method")
        if method == PUSH:
            url = raw.get("endpoint_url")
            if not isinstance(url, str) or not url:
                raise StreamError("push delivery needs an endpoint_url")
            if len(url) > MAX_ENDPOINT_URL:
                raise StreamError(f"endpoint_url must be at most {MAX_ENDPOINT_URL} characters")
            if any(c <= " " or c == "\x7f" for c in url):
                raise StreamError("endpoint_url must not contain spaces or control characters")
            problem = self._fetcher.url_problem(url)
            if problem is not None:
                raise StreamError(f"endpoint_url is not acceptable: {problem}")
            out: dict[str, Any] = {"method": PUSH, "endpoint_url": url}
            auth = raw.get("authorization_header")
            if auth is not None:
                if not isinstance(auth, str) or len(auth) > 2048 or "\n" in auth or "\r" in auth:
                    raise StreamError("authorization_header must be one header value")
                out["authorization_header"] = auth
            return out
        if method == POLL:
            if stream is None:
                return {"method": POLL}  # the endpoint is ours: filled in by _config
            ours = self._poll_url(stream.stream_id)
            if "endpoint_url" in raw and raw["endpoint_url"] != ours:
                raise StreamError(
                    "delivery.endpoint_url is supplied by the transmitter and differs"
                )
            return {"method": POLL, "endpoint_url": ours}
        raise StreamError(f"delivery method must be {PUSH} or {POLL}")

    def _config(
        self, stream_id: str, client_id: str, request: dict[str, Any], delivery: dict[str, Any]
    ) -> dict[str, Any]:
        requested = request.get("events_requested", [])
        if not isinstance(requested, list) or not all(isinstance(e, str) for e in requested):
            raise StreamError("events_requested must be an array of event type URIs")
        description = _text(request.get("description"), "description")
        if delivery["method"] == POLL and "endpoint_url" not in delivery:
            delivery = {**delivery, "endpoint_url": self._poll_url(stream_id)}
        # push: the SET is addressed to the endpoint it is posted to, so a receiver can check that
        # it was meant for it; poll: to the receiver's client id
        aud = delivery["endpoint_url"] if delivery["method"] == PUSH else client_id
        config: dict[str, Any] = {
            "stream_id": stream_id,
            "iss": self.issuer,
            "aud": aud,
            "delivery": delivery,
            "events_supported": list(EVENTS_SUPPORTED),
            "events_requested": requested[:32],
            "events_delivered": [e for e in EVENTS_SUPPORTED if e in requested],
            "min_verification_interval": 0,
        }
        if description is not None:
            config["description"] = description
        return config

    def _poll_url(self, stream_id: str) -> str:
        """A poll stream's endpoint: ours, one per stream (SSF 1.0 §6.1.2)."""
        return f"{self.issuer.rstrip('/')}/ssf/poll/{stream_id}"


def configuration_url(issuer: str) -> str:
    """SSF 1.0 §7.2: the transmitter configuration of ``issuer`` is at
    ``/.well-known/ssf-configuration`` inserted between its host and its path."""
    parts = urlsplit(issuer)
    path = "/.well-known/ssf-configuration" + parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def issuers_of_configuration(url: str) -> tuple[str, ...]:
    """The issuers whose configuration may be at ``url`` (SSF 1.0 §7.2.4: the document's
    ``issuer`` MUST be the one the URL was formed from): the well-known suffix inserted between
    host and path, or appended to the issuer (the same URL for an issuer without a path; for one
    with a path, where a deployment mounted under that path serves it)."""
    parts = urlsplit(url)
    well_known = "/.well-known/ssf-configuration"
    found = []
    if parts.path == well_known or parts.path.startswith(well_known + "/"):
        found.append(
            urlunsplit((parts.scheme, parts.netloc, parts.path[len(well_known) :], "", ""))
        )
    if parts.path.endswith(well_known) and parts.path != well_known:
        found.append(
            urlunsplit((parts.scheme, parts.netloc, parts.path[: -len(well_known)], "", ""))
        )
    return tuple(found)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise StreamError("the body must be a JSON object")
    return body


def _stream_id(value: Any) -> str:
    """A request's ``stream_id``: 400 without one; 404 for a string no stream of ours can have."""
    if not isinstance(value, str) or not value:
        raise StreamError("stream_id is required")
    if STREAM_ID.fullmatch(value) is None:
        raise StreamNotFoundError(value[:64])
    return value


def _text(value: Any, name: str) -> str | None:
    """An optional short text member (``description``, ``reason``, ``state``): no NUL (PostgreSQL
    refuses one in a text column: a ``reason`` with one answered 500)."""
    if value is not None and (
        not isinstance(value, str) or len(value) > MAX_DESCRIPTION or "\x00" in value
    ):
        raise StreamError(f"{name} must be a string of at most {MAX_DESCRIPTION} characters")
    return value


def _same(given: Any, expected: Any) -> bool:
    """Whether a transmitter-supplied member a receiver sent matches ours: the same value; an
    array as a set (order is not meaningful); ``aud`` as a string or a one-element array."""
    if isinstance(expected, list):
        return (
            isinstance(given, list)
            and all(isinstance(v, str) for v in given)
            and sorted(set(given)) == sorted(set(expected))
        )
    if isinstance(expected, str) and isinstance(given, list):
        return given == [expected]
    return type(given) is type(expected) and bool(given == expected)


def _stream_subject(stream_id: str) -> dict[str, Any]:
    return {"format": "opaque", "id": stream_id}


def _status_body(stream: Stream) -> dict[str, Any]:
    body: dict[str, Any] = {"stream_id": stream.stream_id, "status": stream.status}
    if stream.reason is not None:
        body["reason"] = stream.reason
    return body


def _push_error(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "unreadable"
    return str(parsed.get("err", "unknown"))[:64] if isinstance(parsed, dict) else "unknown"
