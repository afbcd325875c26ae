"""An outbox drained into NATS JetStream, and a durable consumer that verifies what it reads.

Generic over where the events come from: an :class:`Outbox` hands out a claim on its oldest
unpublished messages and records, when the claim ends, how many of them JetStream acknowledged
(the reference services' outbox table, the authorization server's ledger: docs/events.md).

Delivery guarantee: every message carries ``Nats-Msg-Id`` (the event id), the publisher waits for
JetStream's ack of each before counting it, and the outbox records the acknowledged prefix only after
those acks. Killed between an ack and that record, the next round publishes the same messages again
and JetStream drops them as duplicates within the stream's ``duplicate_window``: nothing lost,
nothing twice in the stream. NATS down: nothing is acknowledged, the outbox keeps everything and the
loop retries with a capped backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from prometheus_client import Counter

# nats-py is imported where a connection, a stream or a consumer is made: a deployment without
# JetStream (and every CLI command) does not pay for it at start-up
if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

log = structlog.get_logger("trustplane.events")
DUPLICATE_WINDOW = 600.0
PUBLISHED = Counter(
    "trustplane_outbox_published_total", "Events JetStream acknowledged", ["outbox"]
)
PUBLISH_FAILURES = Counter(
    "trustplane_outbox_publish_failures_total",
    "Publishing rounds that failed (NATS down or not acknowledging)",
    ["outbox"],
)
REFUSED = Counter(
    "trustplane_event_refused_total", "Events a verifying consumer terminated", ["stream"]
)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish: ``msg_id`` is the event id (``Nats-Msg-Id``); ``created_at`` the
    epoch seconds of its commit (for the commit-to-ack latency)."""

    subject: str
    data: bytes
    msg_id: str
    created_at: float


@dataclass(slots=True)
class Claim:
    """The messages of one round; the publisher counts in ``acked`` how many JetStream acked (a
    prefix of ``messages``). ``more``: the outbox knows there is more to read right away."""

    messages: Sequence[Outgoing]
    acked: int = 0
    more: bool = False


class Outbox(Protocol):
    def claim(self, limit: int) -> AbstractAsyncContextManager[Claim]:
        """Up to ``limit`` unpublished messages, oldest first. On exit (normal or not) the first
        ``claim.acked`` of them are recorded as published, and only those."""
        ...


@dataclass(frozen=True, slots=True)
class Stream:
    """A JetStream stream the publisher creates (or updates) before its first publish."""

    name: str
    subjects: tuple[str, ...]
    duplicate_window: float = DUPLICATE_WINDOW


async def ensure_streams(js: JetStreamContext, streams: Sequence[Stream]) -> None:
    """Create the streams if they do not exist (idempotent, every process may do it)."""
    from nats.js.api import StreamConfig
    from nats.js.errors import BadRequestError

    for stream in streams:
        config = StreamConfig(
            name=stream.name,
            subjects=list(stream.subjects),
            duplicate_window=stream.duplicate_window,
        )
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


class JetStreamPublisher:
    """Drains an :class:`Outbox` into JetStream at ``nats_url``."""

    def __init__(
        self,
        outbox: Outbox,
        nats_url: str,
        streams: Sequence[Stream],
        *,
        batch: int = 100,
        connect_timeout: float = 2.0,
        name: str = "events",
    ) -> None:
        self.outbox, self.nats_url, self.streams, self.batch = outbox, nats_url, streams, batch
        self._timeout, self._name = connect_timeout, name
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._more = False
        #: seconds from the message's commit to JetStream's ack, for the last 10,000 messages
        self.ack_latencies: deque[float] = deque(maxlen=10_000)

    async def _connect(self) -> JetStreamContext:
        import nats

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
            await ensure_streams(self._js, self.streams)
        return self._js

    async def drain_once(self) -> int:
        """Publish one claim; the number JetStream acked (0 when nothing was waiting). Raises when
        NATS cannot be reached or does not ack (what was not acked stays unpublished)."""
        async with self.outbox.claim(self.batch) as claim:
            self._more = claim.more
            if not claim.messages:
                return 0
            js = await self._connect()
            try:
                for message in claim.messages:
                    await js.publish(
                        message.subject,
                        message.data,
                        timeout=self._timeout * 2,
                        headers={"Nats-Msg-Id": message.msg_id},
                    )
                    claim.acked += 1
                    self.ack_latencies.append(time.time() - message.created_at)
            finally:
                PUBLISHED.labels(outbox=self._name).inc(claim.acked)
            return claim.acked

    async def run(
        self,
        stopping: asyncio.Event,
        *,
        idle: float = 0.2,
        max_backoff: float = 5.0,
        eager: float = 0.01,
        wake: asyncio.Event | None = None,
    ) -> None:
        """Drain until ``stopping`` is set; back off (up to ``max_backoff``) while NATS is down.

        ``wake``: set when something was committed to the outbox (in-process, or a notification
        from the database): the outbox is read once per wake-up (again at once only after a full
        batch), and otherwise every ``idle`` seconds (the fallback for a missed or lost
        notification). Without it, the outbox is read again after ``eager`` seconds, then after
        twice as long each time, up to ``idle``: events come in bursts (a trade lifecycle commits
        one per step), so the next one is read soon after its commit rather than up to ``idle``
        later, while a quiet outbox still costs one query per ``idle``."""
        backoff, pause = idle, eager
        while not stopping.is_set():
            if wake is not None:  # cleared before the read: a commit after it wakes us again
                wake.clear()
            try:
                published = await self.drain_once()
            except Exception as exc:  # NATS down or timing out: retry, the outbox keeps the rows
                PUBLISH_FAILURES.labels(outbox=self._name).inc()
                log.warning(
                    "outbox_publish_failed", outbox=self._name, error=f"{type(exc).__name__}: {exc}"
                )
                await self.close()
                self._more, backoff = False, min(backoff * 2, max_backoff)
                await _wait(stopping, backoff)
                continue
            backoff = idle
            if wake is not None:  # a short batch was all there was: the next commit wakes us
                if published < self.batch and not self._more:
                    await self._rest(stopping, idle, wake)
            elif published or self._more:
                pause = eager
            else:
                await _wait(stopping, pause)
                pause = min(pause * 2, idle)

    async def _rest(self, stopping: asyncio.Event, idle: float, wake: asyncio.Event) -> None:
        """Between two woken rounds: until the next wake-up, at most ``idle`` seconds."""
        await _wait(stopping, idle, wake)

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc, self._js = None, None


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback: one log line instead of its traceback per attempt."""
    log.debug("nats_error", error=f"{type(exc).__name__}: {exc}")


Handler = Callable[[dict[str, Any]], Awaitable[None]]


class Refused(Exception):
    """What a verify function raises for a message that must never be acted on."""


@dataclass
class VerifyingConsumer:
    """A durable pull consumer (explicit ack) on ``stream``/``subject`` that hands only verified
    events to the handler. ``verify`` turns a message body into the event or raises
    :class:`Refused` (or any exception named in ``refusals``): such a message is terminated (never
    redelivered, never handled). A handler that raises gets the message redelivered (nak)."""

    js: JetStreamContext
    stream: str
    subject: str
    durable: str
    verify: Callable[[bytes], dict[str, Any]]
    refusals: tuple[type[Exception], ...] = (Refused,)
    ack_wait: float = 30.0
    refused: list[str] = field(default_factory=list)

    async def consume(self, handler: Handler, *, batch: int = 100, wait: float = 1.0) -> int:
        """Fetch one batch, hand each verified event to ``handler``; the number handled."""
        from nats.js.api import AckPolicy, ConsumerConfig

        sub = await self.js.pull_subscribe(
            self.subject,
            durable=self.durable,
            stream=self.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait),
        )
        try:
            messages = await sub.fetch(batch, timeout=wait)
        except TimeoutError:  # nats-py's own or asyncio's, depending on the code path
            return 0
        handled = 0
        for message in messages:
            try:
                event = self.verify(message.data)
            except self.refusals as exc:
                self.refused.append(str(exc))
                REFUSED.labels(stream=self.stream).inc()
                log.warning("event_refused", stream=self.stream, error=str(exc))
                await message.term()
                continue
            try:
                await handler(event)
            except Exception:
                await message.nak()
                raise
            await message.ack()
            handled += 1
        return handled


async def _wait(stopping: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Up to ``seconds``, or until ``stopping`` (or ``wake``) is set."""
    if wake is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)
        return
    if wake.is_set():
        return
    waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
