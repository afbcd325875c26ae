"""The hand-off between the services' stores: each owner's outbox, verified, learned by the others.

Every service has its own store (docs/settlement.md, "Stores"): execution decides ``create`` and
``execute``, allocation the allocation, settlement everything from the submission on (and the
exceptions); reporting decides nothing. A store learns the other owners' transitions from their
signed events (:meth:`TradeStore.learn`): each owner learns the other two owners, reporting learns
all three, so every store holds the whole history of the trades it knows.

Embedded default: a :class:`Dispatcher` reads an upstream owner's outbox after the commit
(``events_after`` from a cursor per (downstream, upstream), persisted in the downstream store),
verifies every event with the upstream's JWKS and issuer (:func:`verify_event`: a tampered event,
or one of another issuer, is refused, counted and never applied) and hands it to the downstream
store. The services call :meth:`Dispatcher.hand_off` before they answer, so a sequential client
finds its step downstream at once; :meth:`Dispatcher.run` also sweeps every 0.25 s (what another
process committed). An event whose predecessor (from another upstream) has not arrived is kept in
the downstream inbox and applied when the predecessor is; the cursor moves past it.

With NATS JetStream: :func:`learner` is the handler of a
:class:`~trustplane.reference.jetstream.VerifyingConsumer` per (downstream, upstream domain): it
raises :class:`Pending` (the message is redelivered, a nak) while the predecessor is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Counter

from trustplane.reference import machine
from trustplane.reference.events import EventRefused, verify_event
from trustplane.reference.store import APPLIED, KNOWN, PENDING, TradeStore

log = structlog.get_logger("trustplane.reference")
LEARNED = Counter(
    "trustplane_reference_learned_events_total",
    "Upstream events handed to a downstream store, by outcome (applied, known, pending, refused)",
    ["downstream", "outcome"],
)
#: Which owners each store learns from (reporting: every owner).
LEARNS_FROM = {
    machine.EXECUTION: (machine.ALLOCATION, machine.SETTLEMENT),
    machine.ALLOCATION: (machine.EXECUTION, machine.SETTLEMENT),
    machine.SETTLEMENT: (machine.EXECUTION, machine.ALLOCATION),
    machine.REPORTING: machine.OWNERS,
}


@dataclass(frozen=True)
class Upstream:
    """An owner whose events are learned: its store (the outbox read), issuer and JWKS."""

    service: str
    store: TradeStore
    issuer: str
    jwks: Any


@dataclass(frozen=True)
class Route:
    upstream: Upstream
    downstream: TradeStore

    @property
    def consumer(self) -> str:
        """The cursor's name in the downstream store."""
        return f"{self.upstream.service}@{self.upstream.issuer}"[:300]


class Pending(Exception):
    """The event's predecessor has not been learned yet (JetStream: nak, redelivered)."""


async def learn_verified(downstream: TradeStore, jws: str, upstream: Upstream) -> str:
    """Verify ``jws`` as ``upstream``'s event and learn it: :data:`APPLIED`, :data:`KNOWN`,
    :data:`PENDING`, or :class:`EventRefused` (tampered, another issuer, another key): never
    applied, nothing written."""
    try:
        claims = verify_event(jws, upstream.jwks, issuer=upstream.issuer)
    except EventRefused:
        LEARNED.labels(downstream.service or "all", "refused").inc()
        raise
    if machine.owner(str(claims.get("transition"))) != upstream.service:
        LEARNED.labels(downstream.service or "all", "refused").inc()
        raise EventRefused(f"{upstream.service} does not own {claims.get('transition')}")
    outcome = await downstream.learn(claims, jws)
    LEARNED.labels(downstream.service or "all", outcome).inc()
    return outcome


def learner(
    downstream: TradeStore, upstream: Upstream
) -> Callable[[dict[str, Any]], Awaitable[None]]:
    """The handler of a :func:`learning_consumer`: the event (verified by the consumer with the
    same JWKS and issuer, and verified again here) is learned; :class:`Pending` while its
    predecessor is missing, so JetStream redelivers it (nak)."""

    async def handle(event: dict[str, Any]) -> None:
        outcome = await learn_verified(downstream, str(event["jws"]), upstream)
        if outcome == PENDING:
            claims = event["claims"]
            raise Pending(f"{claims.get('transition')} of {claims.get('trade_id')}")

    return handle


class Dispatcher:
    """The embedded hand-off over ``routes`` (one per (upstream, downstream) pair)."""

    def __init__(self, routes: Iterable[Route], *, batch: int = 100) -> None:
        self.routes = list(routes)
        self.batch = batch
        self._lock = asyncio.Lock()
        #: per upstream: the outbox ``seq`` every route from it had handed off at the last sweep
        self._swept: dict[str, int] = {}

    @classmethod
    def between(
        cls, stores: dict[str, TradeStore], upstreams: Iterable[Upstream], **kwargs: Any
    ) -> Dispatcher:
        """Every route from ``upstreams`` to the stores of ``stores`` that learn from them."""
        routes = [
            Route(upstream, store)
            for upstream in upstreams
            for service, store in stores.items()
            if upstream.service in LEARNS_FROM[service] and store is not upstream.store
        ]
        return cls(routes, **kwargs)

    async def hand_off(self, upstream: str | None = None) -> int:
        """Hand every event committed since each route's cursor to its downstream store (only the
        routes from ``upstream`` if given); the number learned (applied now)."""
        applied = 0
        async with self._lock:
            for route in self.routes:
                if upstream is None or route.upstream.service == upstream:
                    applied += await self._route(route)
        return applied

    async def _route(self, route: Route) -> int:
        applied = 0
        while True:
            after = await route.downstream.cursor(route.consumer)
            events = await route.upstream.store.events_after(after, self.batch)
            if not events:
                return applied
            for event in events:
                try:
                    outcome = await learn_verified(route.downstream, event.jws, route.upstream)
                except EventRefused as exc:
                    log.error(
                        "reference_event_refused",
                        upstream=route.upstream.service,
                        downstream=route.downstream.service,
                        event_id=event.event_id,
                        error=str(exc),
                    )
                    continue
                applied += outcome == APPLIED
                if outcome not in (APPLIED, KNOWN):
                    log.info(
                        "reference_event_kept",
                        downstream=route.downstream.service,
                        event_id=event.event_id,
                    )
            await route.downstream.advance(route.consumer, events[-1].seq)
            if len(events) < self.batch:
                return applied

    async def sweep(self) -> int:
        """:meth:`hand_off` for the upstreams whose outbox grew since the last sweep (one
        ``max(seq)`` query each when nothing happened)."""
        applied = 0
        for service in dict.fromkeys(r.upstream.service for r in self.routes):
            store = next(r.upstream.store for r in self.routes if r.upstream.service == service)
            latest = await store.last_seq()
            if latest <= self._swept.get(service, -1):
                continue
            applied += await self.hand_off(service)
            self._swept[service] = latest  # every route from it went past ``latest``
        return applied

    async def run(self, stopping: asyncio.Event, interval: float = 0.25) -> None:
        """Sweep every ``interval`` seconds until ``stopping`` (what other processes committed);
        a failure is logged and the next sweep tries again."""
        while not stopping.is_set():
            try:
                await self.sweep()
            except Exception as exc:  # the sweep must survive a database hiccup
                log.error("reference_handoff_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
