"""The outbox publisher to NATS JetStream, and a verifying consumer.

Streams per domain: ``<prefix>_ORDER`` (subjects ``<prefix>.order.>``), ``_TRADE``,
``_ALLOCATION``, ``_SETTLEMENT``, ``_EXCEPTION``; an event of type ``settlement.submitted`` goes to
subject ``<prefix>.settlement.submitted``. Each message carries ``Nats-Msg-Id`` = the event id, so
JetStream drops a re-publish within the stream's ``duplicate_window``.

Delivery guarantee: the publisher reads unpublished outbox rows in order, publishes each and waits
for JetStream's ack, and only then marks the rows published (one transaction per batch). Killed
(``kill -9``) between the ack and the mark, it re-publishes those rows on restart and JetStream
removes the duplicates by ``Nats-Msg-Id``: nothing is lost, nothing is delivered twice into the
stream, as long as the restart comes within ``duplicate_window`` (default 10 minutes). NATS down:
the rows stay unpublished (the outbox grows) and the publisher retries with a capped backoff.

Consumers: a durable pull consumer with explicit ack per domain; :class:`VerifyingConsumer` acks
an event only after its JWS verified against the publisher's JWKS (a tampered event is terminated
and never handed to the handler) and the handler returned; a handler that raises gets the message
redelivered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import structlog
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError

from trustplane.reference.events import EventRefused, verify_event
from trustplane.reference.store import TradeStore

log = structlog.get_logger("trustplane.reference")
DOMAINS = ("order", "trade", "allocation", "settlement", "exception")
DUPLICATE_WINDOW = 600.0


def stream_name(prefix: str, domain: str) -> str:
    return f"{prefix.upper()}_{domain.upper()}"


def subject_of(prefix: str, event_type: str) -> str:
    return f"{prefix}.{event_type}"


async def ensure_streams(
    js: JetStreamContext, prefix: str, duplicate_window: float = DUPLICATE_WINDOW
) -> None:
    """Create the per-domain streams if they do not exist (idempotent, every process may do it)."""
    for domain in DOMAINS:
        config = StreamConfig(
            name=stream_name(prefix, domain),
            subjects=[f"{prefix}.{domain}.>"],
            duplicate_window=duplicate_window,
        )
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


class OutboxPublisher:
    """Drains ``store``'s outbox into JetStream at ``nats_url``."""

    def __init__(
        self,
        store: TradeStore,
        nats_url: str,
        *,
        prefix: str = "tp",
        batch: int = 100,
        connect_timeout: float = 2.0,
    ) -> None:
        self.store, self.nats_url, self.prefix, self.batch = store, nats_url, prefix, batch
        self._timeout = connect_timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        #: seconds from the row's commit to JetStream's ack, for the last 10,000 rows
        self.ack_latencies: deque[float] = deque(maxlen=10_000)

    async def _connect(self) -> JetStreamContext:
        if self._js is None or self._nc is None or not self._nc.is_connected:
            await self.close()
            # nats-py retries a refused first connection for ever: bound it ourselves
            self._nc = await asyncio.wait_for(
                nats.connect(
                    self.nats_url,
                    connect_timeout=self._timeout,
                    max_reconnect_attempts=0,
                    allow_reconnect=False,
                    error_cb=_quiet,
                ),
                self._timeout * 2,
            )
            self._js = self._nc.jetstream()
            await ensure_streams(self._js, self.prefix)
        return self._js

    async def drain_once(self) -> int:
        """Publish one batch of unpublished rows; the number published (0 when none is left).
        Raises when NATS cannot be reached or does not ack (the rows stay unpublished)."""
        rows = await self.store.unpublished(self.batch)
        if not rows:
            return 0
        js = await self._connect()
        done: list[int] = []
        try:
            for row in rows:
                await js.publish(
                    subject_of(self.prefix, row.type),
                    row.jws.encode("ascii"),
                    headers={"Nats-Msg-Id": row.event_id},
                )
                done.append(row.seq)
                self.ack_latencies.append(time.time() - row.created_at)
        finally:
            await self.store.mark_published(done)  # what JetStream acked, even on a failure
        return len(done)

    async def run(
        self,
        stopping: asyncio.Event,
        *,
        idle: float = 0.2,
        max_backoff: float = 5.0,
        eager: float = 0.01,
    ) -> None:
        """Drain until ``stopping`` is set; back off (up to ``max_backoff``) while NATS is down.

        With nothing to publish, the outbox is read again after ``eager`` seconds, then after
        twice as long each time, up to ``idle``: events come in bursts (a lifecycle commits one per
        step), so the next one is read soon after its commit rather than up to ``idle`` later,
        while a quiet outbox still costs one query per ``idle``."""
        backoff, pause = idle, eager
        while not stopping.is_set():
            try:
                published = await self.drain_once()
            except Exception as exc:  # NATS down or timing out: retry, the outbox keeps the rows
                log.warning("reference_outbox_publish_failed", error=f"{type(exc).__name__}: {exc}")
                await self.close()
                backoff = min(backoff * 2, max_backoff)
                await _wait(stopping, backoff)
                continue
            backoff = idle
            if published:
                pause = eager
            else:
                await _wait(stopping, pause)
                pause = min(pause * 2, idle)

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc, self._js = None, None


async def _wait(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback: one log line instead of its traceback per attempt."""
    log.debug("reference_nats_error", error=f"{type(exc).__name__}: {exc}")


Handler = Callable[[dict[str, Any]], Awaitable[None]]


class VerifyingConsumer:
    """A durable pull consumer (explicit ack) on one domain's stream that verifies every event."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        domain: str,
        durable: str,
        jwks: Any,
        issuer: str,
        prefix: str = "tp",
        ack_wait: float = 30.0,
    ) -> None:
        self.js, self.domain, self.durable, self.prefix = js, domain, durable, prefix
        self.jwks, self.issuer, self.ack_wait = jwks, issuer, ack_wait
        self.refused: list[str] = []

    async def consume(self, handler: Handler, *, batch: int = 100, wait: float = 1.0) -> int:
        """Fetch one batch, hand each verified event to ``handler``; the number handled."""
        sub = await self.js.pull_subscribe(
            f"{self.prefix}.{self.domain}.>",
            durable=self.durable,
            stream=stream_name(self.prefix, self.domain),
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait),
        )
        try:
            messages = await sub.fetch(batch, timeout=wait)
        except nats.errors.TimeoutError:
            return 0
        handled = 0
        for message in messages:
            try:
                event = verify_event(
                    message.data.decode("ascii", "replace"), self.jwks, issuer=self.issuer
                )
            except EventRefused as exc:
                self.refused.append(str(exc))
                log.warning("reference_event_refused", domain=self.domain, error=str(exc))
                await message.term()  # never redelivered, never acted on
                continue
            try:
                await handler(event)
            except Exception:
                await message.nak()  # redelivered
                raise
            await message.ack()
            handled += 1
        return handled


def main(argv: list[str] | None = None) -> None:
    """``python -m trustplane.reference.jetstream --database URL --nats URL``: run the publisher
    until interrupted (the outbox publisher process of a deployment, and of the kill -9 test)."""
    from pathlib import Path

    from trustplane.reference.events import EventSigner
    from trustplane.storage.db import Database

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--database", required=True)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--key", type=Path, required=True, help="the service's event key (PEM)")
    parser.add_argument("--issuer", default="https://reference.invalid")
    parser.add_argument("--prefix", default="tp")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)

    async def run() -> None:
        store = TradeStore(Database(args.database), EventSigner.from_file(args.issuer, args.key))
        await store.create_schema()
        publisher = OutboxPublisher(store, args.nats, prefix=args.prefix, batch=args.batch)
        try:
            await publisher.run(asyncio.Event())
        finally:
            await publisher.close()
            await store.db.dispose()

    asyncio.run(run())


if __name__ == "__main__":
    main()
