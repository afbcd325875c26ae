"""The outbox publisher to NATS JetStream, and a verifying consumer.

Streams per domain: ``<prefix>_ORDER`` (subjects ``<prefix>.order.>``), ``_TRADE``,
``_ALLOCATION``, ``_SETTLEMENT``, ``_EXCEPTION``; an event of type ``settlement.submitted`` goes to
subject ``<prefix>.settlement.submitted``. Each message carries ``Nats-Msg-Id`` = the event id, so
JetStream drops a re-publish within the stream's ``duplicate_window``.

Delivery guarantee: the publisher reads unpublished outbox rows in order, publishes them (pipelined:
:mod:`trustplane.events.jetstream`) and waits for JetStream's acks, and only then marks the acked
prefix published (one transaction per batch). Killed
(``kill -9``) between the ack and the mark, it re-publishes those rows on restart and JetStream
removes the duplicates by ``Nats-Msg-Id``: nothing is lost, nothing is delivered twice into the
stream, as long as the restart comes within ``duplicate_window`` (default 10 minutes). NATS down:
the rows stay unpublished (the outbox grows) and the publisher retries with a capped backoff. A
woken publisher on PostgreSQL makes a round's mark with the next round's read, one statement
(``TradeStore.mark_then_unpublished``), or alone when no commit comes within :data:`LINGER`
seconds: the mark is later, never before the ack, and a publisher killed before it re-publishes
those rows as above.

When it reads: on PostgreSQL, a statement trigger on the outbox (made by the publisher at start,
:func:`notify_on_commit`) sends ``NOTIFY`` on :data:`OUTBOX_CHANNEL` with every insert, delivered
when the writing transaction commits; the publisher ``LISTEN``s on one connection per store and
reads the outbox once per wake-up, and every :data:`FALLBACK` seconds whatever happens (a lost
notification, the listening connection down, a trigger it may not create). In the serving process
the services' own commits wake it too (``TradeServices.on_commit``). On SQLite, without such a
wake-up, it polls: soon after a publish, then less often, up to every 0.2 s.

Consumers: a durable pull consumer with explicit ack per domain; :class:`VerifyingConsumer` acks
an event only after its JWS verified against the publisher's JWKS (a tampered event is terminated
and never handed to the handler) and the handler returned; a handler that raises gets the message
redelivered.

The loop and the consumer are :mod:`trustplane.events.jetstream`'s, shared with the authorization
server's security events (docs/events.md); this module binds them to the trade outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog

from trustplane.events.jetstream import (
    DUPLICATE_WINDOW,
    Claim,
    Handler,
    JetStreamPublisher,
    Outgoing,
    Stream,
    _wait,
)
from trustplane.events.jetstream import VerifyingConsumer as _Consumer
from trustplane.events.jetstream import ensure_streams as _ensure
from trustplane.reference import machine
from trustplane.reference.events import EventRefused, verify_event
from trustplane.reference.handoff import Upstream, learn_verified
from trustplane.reference.store import APPLIED, KNOWN, TradeStore
from trustplane.storage.notify import GenerationListener

log = structlog.get_logger("trustplane.reference")
#: The channel the outbox trigger notifies (payload empty) and the publishers listen on.
OUTBOX_CHANNEL = "trustplane_reference_outbox"
#: Seconds between two reads of an outbox with a wake-up (notifications, in-process commits).
FALLBACK = 1.0
#: Seconds a woken publisher keeps a round's mark for the next round's read (one statement for
#: both on PostgreSQL) before it makes it alone: a lifecycle's commits come a few milliseconds apart.
LINGER = 0.05
# the trigger's SQL, constants only: the channel is OUTBOX_CHANNEL, the table store.outbox
_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('trustplane_outbox_notify'))"
_FOUND_SQL = (
    "SELECT 1 FROM pg_trigger WHERE tgname = 'trustplane_outbox_notify' "
    "AND tgrelid = to_regclass('ref_outbox')"
)
_FUNCTION_SQL = """CREATE OR REPLACE FUNCTION trustplane_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('trustplane_reference_outbox', ''); RETURN NULL; END $$"""
_TRIGGER_SQL = """CREATE TRIGGER trustplane_outbox_notify AFTER INSERT ON ref_outbox
FOR EACH STATEMENT EXECUTE FUNCTION trustplane_outbox_notify()"""

DOMAINS = ("order", "trade", "allocation", "settlement", "exception")
#: The domains (streams) each owner's events go to.
OWNER_DOMAINS = {
    machine.EXECUTION: ("order", "trade"),
    machine.ALLOCATION: ("allocation",),
    machine.SETTLEMENT: ("settlement", "exception"),
}
__all__ = [
    "DOMAINS",
    "DUPLICATE_WINDOW",
    "Handler",
    "LearningConsumer",
    "OutboxPublisher",
    "VerifyingConsumer",
]


def stream_name(prefix: str, domain: str) -> str:
    return f"{prefix.upper()}_{domain.upper()}"


def subject_of(prefix: str, event_type: str) -> str:
    return f"{prefix}.{event_type}"


def streams(prefix: str, duplicate_window: float = DUPLICATE_WINDOW) -> list[Stream]:
    return [Stream(stream_name(prefix, d), (f"{prefix}.{d}.>",), duplicate_window) for d in DOMAINS]


async def ensure_streams(js: Any, prefix: str, duplicate_window: float = DUPLICATE_WINDOW) -> None:
    """Create the per-domain streams if they do not exist (idempotent, every process may do it)."""
    await _ensure(js, streams(prefix, duplicate_window))


#: The outbox's oldest unpublished rows, and their mark: built once (PostgreSQL path).
class _TradeOutbox:
    """The outbox table as the generic publisher's :class:`~trustplane.events.jetstream.Outbox`:
    :meth:`TradeStore.unpublished` and :meth:`TradeStore.mark_published` (on PostgreSQL each one
    statement straight to asyncpg on the autocommit engine: one round trip, no compilation)."""

    def __init__(self, store: TradeStore, prefix: str) -> None:
        self.store, self.prefix = store, prefix
        #: Whether a round's mark waits for the next round's read (:meth:`claim`).
        self.carry = False
        #: The acked ``seq``s not marked yet: the next read marks them, or :meth:`flush`.
        self.carried: list[int] = []

    async def _unpublished(self, limit: int) -> list[tuple[int, str, str, str, float]]:
        """(seq, type, jws, event id, commit epoch seconds) of the oldest unpublished rows, the
        carried mark made first (one statement on PostgreSQL's autocommit engine)."""
        stored = await self.store.mark_then_unpublished(self.carried, limit)
        self.carried = []
        return [(r.seq, r.type, r.jws, r.event_id, r.created_at) for r in stored]

    async def _mark(self, seqs: list[int]) -> None:
        await self.store.mark_published(seqs)

    async def flush(self) -> None:
        """Mark what was carried (the outbox quiet: no read to carry it)."""
        if self.carried:
            await self._mark(self.carried)
            self.carried = []

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[Claim]:
        rows = await self._unpublished(limit)
        claim = Claim(
            [
                Outgoing(subject_of(self.prefix, kind), jws.encode("ascii"), event_id, created)
                for _seq, kind, jws, event_id, created in rows
            ]
        )
        try:
            yield claim
        finally:  # what JetStream acked, even on a failure: now, or with the next read
            acked = [row[0] for row in rows[: claim.acked]]
            if self.carry:
                self.carried = acked
            else:
                await self._mark(acked)


class OutboxPublisher(JetStreamPublisher):
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
        self._outbox = _TradeOutbox(store, prefix)
        super().__init__(
            self._outbox, nats_url, streams(prefix), batch=batch,
            connect_timeout=connect_timeout, name="reference",
        )  # fmt: skip
        self.store, self.prefix = store, prefix
        #: Seconds a woken publisher waits for the next commit before it marks the last round
        #: alone (:meth:`_rest`).
        self.linger = LINGER

    async def run(
        self,
        stopping: asyncio.Event,
        *,
        idle: float | None = None,
        max_backoff: float = 5.0,
        eager: float = 0.01,
        wake: asyncio.Event | None = None,
    ) -> None:
        """Drain until ``stopping``: on PostgreSQL woken by the outbox's notifications (and by
        ``wake``, the in-process commits), read every ``idle`` seconds (default :data:`FALLBACK`)
        besides; on SQLite woken by ``wake`` only, polling as the generic publisher does without
        it. Woken, a round's mark goes with the next round's read (:data:`LINGER`)."""
        try:
            await self._run(stopping, idle, max_backoff, eager, wake)
        finally:
            self._outbox.carry = False
            with contextlib.suppress(Exception):  # what is left unmarked is published again
                await self._outbox.flush()

    async def _rest(self, stopping: asyncio.Event, idle: float, wake: asyncio.Event) -> None:
        """Wait for the next commit; a round's mark still carried after :attr:`linger` seconds is
        made alone, so that a quiet outbox shows everything JetStream acked as published."""
        if self._outbox.carried:
            await _wait(stopping, self.linger, wake)
            if wake.is_set() or stopping.is_set():
                return
            try:
                await self._outbox.flush()
            except Exception as exc:  # the database away: the next read carries the mark
                log.warning("outbox_mark_failed", error=f"{type(exc).__name__}: {exc}")
        await _wait(stopping, idle, wake)

    async def _run(
        self,
        stopping: asyncio.Event,
        idle: float | None,
        max_backoff: float,
        eager: float,
        wake: asyncio.Event | None,
    ) -> None:
        listener = None
        if not self.store.db.is_sqlite and await notify_on_commit(self.store):
            wake = wake if wake is not None else asyncio.Event()
            listener = GenerationListener(self.store.db.url, OUTBOX_CHANNEL, wake)
        if wake is None:
            await super().run(
                stopping, idle=idle or 0.2, max_backoff=max_backoff, eager=eager, wake=None
            )
            return
        listening = asyncio.create_task(listener.run(stopping)) if listener is not None else None
        self._outbox.carry = not self.store.db.is_sqlite  # one statement for both: PostgreSQL
        try:
            await super().run(
                stopping, idle=idle or FALLBACK, max_backoff=max_backoff, eager=eager, wake=wake
            )
        finally:
            if listening is not None:
                listening.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listening


async def notify_on_commit(store: TradeStore) -> bool:
    """Make the outbox's notifying trigger on PostgreSQL if it is missing (several processes may
    start at once: under an advisory lock); False on SQLite, or when it cannot be made (logged: the
    publisher then polls)."""
    if store.db.is_sqlite:
        return False
    try:
        async with store.db.engine.begin() as conn:
            await conn.exec_driver_sql(_LOCK_SQL)
            found = await conn.exec_driver_sql(_FOUND_SQL)
            if found.first() is None:
                await conn.exec_driver_sql(_FUNCTION_SQL)
                await conn.exec_driver_sql(_TRIGGER_SQL)
    except Exception as exc:  # no right to make it: the fallback poll still publishes everything
        log.warning("reference_outbox_trigger_failed", error=f"{type(exc).__name__}: {exc}")
        return False
    return True


class VerifyingConsumer(_Consumer):
    """A durable pull consumer (explicit ack) on one domain's stream that verifies every event."""

    def __init__(
        self,
        js: Any,
        *,
        domain: str,
        durable: str,
        jwks: Any,
        issuer: str,
        prefix: str = "tp",
        ack_wait: float = 30.0,
    ) -> None:
        def verify(data: bytes) -> dict[str, Any]:
            return verify_event(data.decode("ascii", "replace"), jwks, issuer=issuer)

        super().__init__(
            js, stream_name(prefix, domain), f"{prefix}.{domain}.>", durable, verify,
            (EventRefused,), ack_wait,
        )  # fmt: skip
        self.domain, self.prefix, self.jwks, self.issuer = domain, prefix, jwks, issuer


class LearningConsumer:
    """The hand-off over JetStream: a durable pull consumer (explicit ack) per (``downstream``
    store, one of ``upstream``'s domains), learning each event (:func:`learn_verified`: verified
    with the upstream's JWKS and issuer, then :meth:`TradeStore.learn`). Learned (or known
    already): acked. Pending (its predecessor, from another owner, has not arrived): nak'ed with
    ``retry`` seconds of delay, redelivered until it applies. Refused (tampered, another issuer or
    key, a transition the upstream does not own): terminated, never applied. Messages are handled
    one by one, so a pending one holds up nothing behind it."""

    def __init__(
        self,
        js: Any,
        downstream: TradeStore,
        upstream: Upstream,
        domain: str,
        *,
        prefix: str = "tp",
        ack_wait: float = 30.0,
        retry: float = 0.2,
    ) -> None:
        if domain not in OWNER_DOMAINS[upstream.service]:
            raise ValueError(f"{upstream.service} publishes no {domain} events")
        self.js, self.downstream, self.upstream, self.domain = js, downstream, upstream, domain
        self.prefix, self.ack_wait, self.retry = prefix, ack_wait, retry
        self.durable = f"learn-{downstream.service}-{upstream.service}-{domain}"
        self.refused: list[str] = []
        self.outcomes: list[str] = []

    async def consume(self, *, batch: int = 100, wait: float = 1.0) -> int:
        """Fetch one batch and handle it; the number applied now."""
        from nats.js.api import AckPolicy, ConsumerConfig

        sub = await self.js.pull_subscribe(
            f"{self.prefix}.{self.domain}.>",
            durable=self.durable,
            stream=stream_name(self.prefix, self.domain),
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait),
        )
        try:
            messages = await sub.fetch(batch, timeout=wait)
        except TimeoutError:
            return 0
        applied = 0
        for message in messages:
            jws = message.data.decode("ascii", "replace")
            try:
                outcome = await learn_verified(self.downstream, jws, self.upstream)
            except EventRefused as exc:
                self.refused.append(str(exc))
                await message.term()
                continue
            self.outcomes.append(outcome)
            if outcome in (APPLIED, KNOWN):
                await message.ack()
                applied += outcome == APPLIED
            else:
                await message.nak(delay=self.retry)
        return applied

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until ``stopping``; a failure (NATS, the store) is logged and retried."""
        while not stopping.is_set():
            try:
                await self.consume()
            except Exception as exc:  # NATS or the store down: try again shortly
                log.error("reference_learning_failed", durable=self.durable, error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 1.0)


def learning_consumers(
    js: Any, stores: dict[str, TradeStore], upstreams: list[Upstream], *, prefix: str = "tp"
) -> list[LearningConsumer]:
    """One consumer per (store that learns from an upstream, that upstream's domain)."""
    from trustplane.reference.handoff import LEARNS_FROM

    return [
        LearningConsumer(js, store, upstream, domain, prefix=prefix)
        for upstream in upstreams
        for service, store in stores.items()
        if upstream.service in LEARNS_FROM[service] and store is not upstream.store
        for domain in OWNER_DOMAINS[upstream.service]
    ]


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
