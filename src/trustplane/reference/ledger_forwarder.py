"""The outbox forwarder to the authorization server's audit ledger (``POST {issuer}/audit/events``).

It reads the rows of the service's outbox not yet delivered to the ledger (``ref_outbox.ledger_at``,
independent of JetStream's ``published_at``), in commit order, posts them in batches (at most
:data:`MAX_BATCH` events and :data:`MAX_BATCH_BYTES`) with an access token for ``{issuer}/audit``
with scope ``audit:ingest`` (client credentials, RFC 6749 §4.4, authenticated by the service's
client), and marks the rows delivered only after the ledger answered 200 for them. Every request
goes through the guarded outbound fetcher (:mod:`trustplane.outbound`).

Guarantees:

- **nothing lost**: a row is marked only after the ledger acknowledged it; the ledger down, slow or
  answering 5xx leaves the rows undelivered, and :meth:`LedgerForwarder.run` retries with a capped
  backoff;
- **never twice in the ledger**: the ledger is idempotent by (``iss``, ``jti``), so a batch re-sent
  after a lost answer (or a forwarder killed between the answer and the mark) comes back
  ``duplicate`` and is marked;
- **a refused event stops the forwarder** (400: tampered row, a key or issuer the client is not
  registered with): the events before it are delivered one by one, the refused one and those after
  it stay undelivered and :class:`LedgerRefused` says why. Skipping it would hide a gap in the
  ledger; the operator fixes the registration (or investigates the row) and the forwarder resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import orjson
import structlog

from trustplane.outbound import OutboundError, OutboundFetcher
from trustplane.pep.client_auth import ClientAuth
from trustplane.pep.keys import check_url
from trustplane.reference.store import StoredEvent, TradeStore

log = structlog.get_logger("trustplane.reference")
SCOPE = "audit:ingest"
MAX_BATCH = 50
MAX_BATCH_BYTES = 512 * 1024
MAX_ANSWER_BYTES = 256 * 1024


class LedgerUnavailable(Exception):
    """The ledger could not be reached or did not acknowledge: retry later, nothing was marked."""


class LedgerRefused(Exception):
    """The ledger refused an event (400) or the client's right to record (403): not retried by
    itself; ``event_id`` is the outbox row's event, when one event was refused."""

    def __init__(self, detail: str, event_id: str | None = None) -> None:
        super().__init__(detail)
        self.event_id = event_id


class LedgerForwarder:
    """Drains ``store``'s outbox into the ledger of the authorization server ``issuer``."""

    def __init__(
        self,
        store: TradeStore,
        issuer: str,
        auth: ClientAuth,
        fetcher: OutboundFetcher,
        *,
        token_endpoint: str | None = None,
        batch: int = MAX_BATCH,
    ) -> None:
        issuer = issuer.rstrip("/")
        self.store, self._auth, self._fetcher = store, auth, fetcher
        self.endpoint = check_url(issuer + "/audit/events", "ledger endpoint", fetcher)
        self._token_endpoint = check_url(
            token_endpoint or issuer + "/token", "token endpoint", fetcher
        )
        self._audience = issuer + "/audit"
        self.batch = max(1, min(batch, MAX_BATCH))
        self._token: tuple[str, float] | None = None
        #: rows delivered, and failed rounds of :meth:`run` (the ledger unreachable or refusing)
        self.delivered = self.failures = 0

    async def drain_once(self) -> int:
        """Deliver one batch; the number of rows marked (0 when none is left). Raises
        :class:`LedgerUnavailable` (retry) or :class:`LedgerRefused` (stop)."""
        rows = _within_bytes(await self.store.undelivered_to_ledger(self.batch))
        if not rows:
            return 0
        status, detail = await self._post(rows)
        if status == 400 and len(rows) > 1:
            return await self._one_by_one(rows)
        if status == 400:
            raise LedgerRefused(
                f"the ledger refused event {rows[0].event_id}: {detail}", rows[0].event_id
            )
        await self.store.mark_delivered_to_ledger([r.seq for r in rows])
        self.delivered += len(rows)
        return len(rows)

    async def _one_by_one(self, rows: Sequence[StoredEvent]) -> int:
        """A batch was refused: deliver the events before the refused one, then stop at it."""
        done = 0
        for row in rows:
            status, detail = await self._post([row])
            if status == 400:
                if done:
                    log.warning("reference_ledger_partial", delivered=done)
                raise LedgerRefused(
                    f"the ledger refused event {row.event_id}: {detail}", row.event_id
                )
            await self.store.mark_delivered_to_ledger([row.seq])
            self.delivered += 1
            done += 1
        return done

    async def _post(self, rows: Sequence[StoredEvent]) -> tuple[int, str]:
        """200 or 400 with the ledger's reason; anything else raises."""
        content = orjson.dumps({"events": [r.jws for r in rows]})
        for attempt in (1, 2):
            headers = {
                "Authorization": f"Bearer {await self._access_token()}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            }
            try:
                answer = await self._fetcher.request(
                    "POST", self.endpoint, purpose="reference_ledger", content=content,
                    headers=headers, max_bytes=MAX_ANSWER_BYTES,
                )  # fmt: skip
            except OutboundError as exc:
                raise LedgerUnavailable(f"{exc.outcome}: {exc}") from None
            if answer.status != 401 or attempt == 2:
                break
            self._token = None  # expired or revoked early: once more with a fresh token
        detail = _description(answer.body)
        if answer.status in (200, 400):
            return answer.status, detail
        if answer.status in (401, 403):
            raise LedgerRefused(f"the ledger refused the client ({answer.status}): {detail}")
        raise LedgerUnavailable(f"the ledger answered {answer.status}: {detail}")

    async def _access_token(self) -> str:
        if self._token is not None and self._token[1] > time.monotonic():
            return self._token[0]
        form = {"grant_type": "client_credentials", "scope": SCOPE, "resource": self._audience}
        headers = {"Accept": "application/json"}
        self._auth.apply(form, headers)
        try:
            answer = await self._fetcher.request(
                "POST", self._token_endpoint, purpose="reference_ledger_token", data=form,
                headers=headers,
            )  # fmt: skip
        except OutboundError as exc:
            raise LedgerUnavailable(f"token endpoint {exc.outcome}: {exc}") from None
        body = _object(answer.body) if answer.status == 200 else {}
        token, lifetime = body.get("access_token"), body.get("expires_in", 60)
        if answer.status in (400, 401):
            raise LedgerRefused(f"no token for the ledger: {_description(answer.body)}")
        if not isinstance(token, str) or not isinstance(lifetime, int):
            raise LedgerUnavailable(f"the token endpoint answered {answer.status}")
        self._token = (token, time.monotonic() + max(lifetime - 30, lifetime / 2))
        return token

    async def forward_all(self) -> int:
        """Deliver everything undelivered now (the demo, tests, ``--once``); raises on a failure."""
        total = 0
        while (n := await self.drain_once()) > 0:
            total += n
        return total

    async def run(
        self, stopping: asyncio.Event, *, idle: float = 0.2, max_backoff: float = 5.0
    ) -> None:
        """Forward until ``stopping`` is set. The ledger unreachable: retried with a backoff
        doubling up to ``max_backoff``. Refused: logged as an error and retried at
        ``max_backoff`` (a fixed registration lets it through; the rows wait meanwhile)."""
        backoff = idle
        while not stopping.is_set():
            try:
                forwarded = await self.drain_once()
                backoff = idle
            except LedgerUnavailable as exc:
                log.warning("reference_ledger_unavailable", error=str(exc))
                forwarded, backoff = 0, min(backoff * 2, max_backoff)
                self.failures += 1
            except LedgerRefused as exc:
                log.error("reference_ledger_refused", error=str(exc), event_id=exc.event_id)
                forwarded, backoff = 0, max_backoff
                self.failures += 1
            if forwarded == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), backoff)


def _within_bytes(rows: list[StoredEvent]) -> list[StoredEvent]:
    """The longest prefix of ``rows`` under :data:`MAX_BATCH_BYTES` (always at least one)."""
    size = 0
    for i, row in enumerate(rows):
        size += len(row.jws) + 3
        if size > MAX_BATCH_BYTES and i > 0:
            return rows[:i]
    return rows


def _object(body: bytes) -> dict[str, object]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _description(body: bytes) -> str:
    found = _object(body)
    return str(found.get("error_description") or found.get("error") or "")[:512]
