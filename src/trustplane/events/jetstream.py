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

Pipelined: a round sends its messages (at most ``in_flight`` at a time) without waiting, each with
its own reply subject on one inbox per connection, then waits for their acks together (at most the
publish timeout after the last one was sent). Only the acknowledged prefix, in outbox order, counts:
from the first message without an ack (none in time, an error, the connection closed) on, nothing
counts, even what JetStream acked after it; those are published again in a later round and the
stream drops the repeats by ``Nats-Msg-Id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

log = structlog.get_logger("trustplane.events")
DUPLICATE_WINDOW = 600.0
#: Messages a publisher sends before it waits for their acks (a round's claim is cut in such windows).
IN_FLIGHT = 128
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


class PublishFailed(Exception):
    """JetStream did not acknowledge every message of a round (the acked prefix still counts)."""


class _Window:
    """The acks awaited for up to ``in_flight`` messages of a round: message ``i`` is answered
    on ``<inbox>.<first + i>``; ``done`` resolves once each has an answer (or the connection
    closed). ``acks[i]``: None unanswered, True acked, False refused (``error`` says why)."""

    __slots__ = ("acks", "done", "error", "first", "left")

    def __init__(self, first: int, size: int) -> None:
        self.first, self.left = first, size
        self.acks: list[bool | None] = [None] * size
        self.error = ""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def answer(self, index: int, refusal: str | None) -> None:
        if not 0 <= index < len(self.acks) or self.acks[index] is not None:
            return  # not this window's, or answered already
        self.acks[index] = refusal is None
        if refusal is not None and not self.error:
            self.error = refusal
        self.left -= 1
        if not self.left:
            self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def prefix(self, sent: int) -> int:
        """How many of the first ``sent`` messages were acked before the first that was not."""
        for index in range(sent):
            if not self.acks[index]:
                return index
        return sent


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
        in_flight: int = IN_FLIGHT,
    ) -> None:
        self.outbox, self.nats_url, self.streams, self.batch = outbox, nats_url, streams, batch
        self._timeout, self._name, self.in_flight = connect_timeout, name, max(1, in_flight)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._more = False
        #: the acks' inbox (``<inbox>.<number>``, one subscription per connection), the next
        #: message's number, and the window whose acks are awaited
        self._inbox, self._number = "", 0
        self._window: _Window | None = None
        #: seconds from the message's commit to JetStream's ack, for the last 10,000 messages
        self.ack_latencies: deque[float] = deque(maxlen=10_000)

    async def _connect(self) -> Client:
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
                    disconnected_cb=self._lost,
                    closed_cb=self._lost,
                ),
                self._timeout * 2,
            )
            self._js = self._nc.jetstream()
            await ensure_streams(self._js, self.streams)
            self._inbox = self._nc.new_inbox() + "."
            await self._nc.subscribe(self._inbox + "*", cb=self._answered)
        return self._nc

    async def drain_once(self) -> int:
        """Publish one claim; the number JetStream acked (0 when nothing was waiting). Raises when
        NATS cannot be reached or does not ack (what was not acked stays unpublished)."""
        async with self.outbox.claim(self.batch) as claim:
            self._more = claim.more
            if not claim.messages:
                return 0
            nc = await self._connect()
            try:
                messages, step = claim.messages, self.in_flight
                for start in range(0, len(messages), step):
                    await self._publish(nc, claim, messages[start : start + step])
            finally:
                PUBLISHED.labels(outbox=self._name).inc(claim.acked)
            return claim.acked

    async def _publish(self, nc: Client, claim: Claim, messages: Sequence[Outgoing]) -> None:
        """Send ``messages`` without waiting, then wait for their acks together; count the acked
        prefix in ``claim.acked``. Raises unless every one was acked."""
        window = self._window = _Window(self._number, len(messages))
        self._number += len(messages)
        sent, failure = 0, None
        try:
            for message in messages:
                await nc.publish(
                    message.subject,
                    message.data,
                    reply=f"{self._inbox}{window.first + sent}",
                    headers={"Nats-Msg-Id": message.msg_id},
                )
                sent += 1
        except Exception as exc:  # the connection lost: the acks of those sent may still count
            failure = exc
            window.left -= len(messages) - sent
            if not window.left:
                window.finish()
        try:
            await asyncio.wait_for(window.done, self._timeout * 2)
        except TimeoutError:
            pass
        finally:
            self._window = None
        acked = window.prefix(sent)
        claim.acked += acked
        now = time.time()
        self.ack_latencies.extend(now - message.created_at for message in messages[:acked])
        if failure is not None:
            raise failure
        if acked < len(messages):
            raise PublishFailed(
                f"JetStream acked {acked} of {len(messages)} in order: {window.error or 'no ack'}"
            )

    async def _answered(self, msg: Msg) -> None:
        """An ack (or a refusal) on the inbox: JetStream's answer to one message."""
        window = self._window
        if window is None:
            return  # a late answer to a window given up on: its message is published again
        try:
            number = int(msg.subject[len(self._inbox) :])
        except ValueError:
            return
        window.answer(number - window.first, _refusal(msg))

    async def _lost(self) -> None:
        """The connection closed: no more acks will come for the window awaited."""
        if self._window is not None:
            self._window.finish()

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


def _refusal(msg: Msg) -> str | None:
    """None for JetStream's ack (``{"stream": ..., "seq": ...}``), else why it is none: an API
    error, or no stream for the subject (a 503 status with no body)."""
    try:
        answer = json.loads(msg.data)
    except ValueError:
        status = (msg.headers or {}).get("Status", "")
        return f"no JetStream answer (status {status})" if status else "not an ack"
    if not isinstance(answer, dict) or "error" in answer or "seq" not in answer:
        error = answer.get("error") if isinstance(answer, dict) else None
        return f"JetStream refused: {error}"
    return None


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
