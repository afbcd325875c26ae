"""The hand-off between the services' stores: each owner's outbox, verified, learned by the others.

Every service has its own store (docs/settlement.md, "Stores"): execution decides ``create`` and
``execute``, allocation the allocation, settlement everything from the submission on (and the
exceptions); reporting decides nothing. A store learns the other owners' transitions from their
signed events (:meth:`TradeStore.learn`): settlement and reporting learn every other owner's, so
they hold the whole history of the trades they know; execution and allocation learn what their
own decisions read, the history up to their last step (:func:`concerns`: execution only
settlement's exceptions before the execution, allocation the execution's events and settlement's
exceptions before the approval).

Embedded default: a :class:`Dispatcher` reads an upstream owner's outbox after the commit
(``events_after`` from a cursor per (downstream, upstream), persisted in the downstream store and
kept in memory by the process that read or moved it; one read per upstream for all its routes),
verifies every event with the upstream's JWKS and issuer (:func:`verify_event`, once per event
for all the routes: a tampered event, or one of another issuer, is refused, counted and never
applied) and hands it to the downstream store, the cursor moved in the transaction that learns
the route's last event. The services call :meth:`Dispatcher.hand_off` before they answer, so a sequential client
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
from trustplane.reference.store import (
    APPLIED,
    PENDING,
    SKIPPED,
    StoredEvent,
    TradeStore,
    concerns,
    payload_of,
)

log = structlog.get_logger("trustplane.reference")
LEARNED = Counter(
    "trustplane_reference_learned_events_total",
    "Upstream events handed to a downstream store, by outcome (applied, known, pending, refused)",
    ["downstream", "outcome"],
)
#: Which owners each store learns from (reporting: every owner). Execution acts only on a
#: ``created`` trade, so no transition of allocation's ever concerns it
#: (:func:`~trustplane.reference.store.concerns`): of settlement's, only the exceptions raised
#: before the execution; allocation needs settlement's only up to the approval.
LEARNS_FROM = {
    machine.EXECUTION: (machine.SETTLEMENT,),
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


def _signs_for(upstream: Upstream) -> bool:
    """Whether ``upstream``'s store signs its events as ``upstream`` says they are signed: its
    issuer, and a key its JWKS publishes (the events it commits in this process need no
    verification before they are learned here)."""
    store = upstream.store
    if not store.signs or store.signer.issuer != upstream.issuer:
        return False
    jwks = upstream.jwks if isinstance(upstream.jwks, dict) else {}
    keys = jwks.get("keys")
    return isinstance(keys, list) and store.signer.public_jwk() in keys


def verified(jws: str, upstream: Upstream) -> dict[str, Any]:
    """The claims of ``jws`` verified as ``upstream``'s event (its JWKS, its issuer, a transition it
    owns), or :class:`EventRefused` (tampered, another issuer, another key, another's transition)."""
    claims = verify_event(jws, upstream.jwks, issuer=upstream.issuer)
    if machine.owner(str(claims.get("transition"))) != upstream.service:
        raise EventRefused(f"{upstream.service} does not own {claims.get('transition')}")
    return claims


#: An outbox event's verified claims, or why it was refused.
Checked = dict[str, Any] | EventRefused


def _checked(jws: str, upstream: Upstream) -> Checked:
    try:
        return verified(jws, upstream)
    except EventRefused as exc:
        return exc


async def learn_verified(downstream: TradeStore, jws: str, upstream: Upstream) -> str:
    """Verify ``jws`` as ``upstream``'s event and learn it: :data:`APPLIED`, :data:`KNOWN`,
    :data:`PENDING`, or :class:`EventRefused` (tampered, another issuer, another key): never
    applied, nothing written."""
    try:
        claims = verified(jws, upstream)
    except EventRefused:
        LEARNED.labels(downstream.service or "all", "refused").inc()
        raise
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
    """The embedded hand-off over ``routes`` (one per (upstream, downstream) pair).

    What one hand-off costs (it runs before the service answers): per upstream, one read of its
    outbox after the lowest of its routes' cursors, and one verification per event whatever the
    number of routes; per route and event, the store's learning transaction, which also moves the
    route's cursor when it learns the route's last event (no transaction of its own). A route's
    cursor is kept in memory once read or moved here; the downstream store's row is the truth: it
    never moves back, and when another process moved it further (several processes handing off
    one upstream) this one finds out at its next learn (a redelivery, :data:`KNOWN`, or a cursor
    that would not move) and takes the store's value: it may re-read what another process handed
    off, never skip an event."""

    def __init__(self, routes: Iterable[Route], *, batch: int = 100) -> None:
        self.routes = list(routes)
        self.batch = batch
        self._lock = asyncio.Lock()
        #: per upstream: the outbox ``seq`` every route from it had handed off at the last sweep
        self._swept: dict[str, int] = {}
        #: per route (its index): its cursor as this process last read or moved it
        self._cursors: dict[int, int] = {}
        #: per route: its cursor in the downstream store as last read or moved here (behind
        #: ``_cursors`` while only events the store does not need went past)
        self._stored: dict[int, int] = {}
        #: the routes from each upstream (by identity: its outbox is read once for all of them)
        self._groups: dict[int, list[int]] = {}
        for i, route in enumerate(self.routes):
            self._groups.setdefault(id(route.upstream), []).append(i)
        #: the upstreams (by identity) whose own commits in this process are handed off from
        #: memory: their store signs with a key of their JWKS, for their issuer
        self._own: set[int] = set()
        for group in self._groups.values():
            upstream = self.routes[group[0]].upstream
            if _signs_for(upstream):
                upstream.store.keep_committed()
                self._own.add(id(upstream))

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

    async def hand_off(self, upstream: str | None = None, *, event_id: str | None = None) -> int:
        """Hand every event committed since each route's cursor to its downstream store (only the
        routes from ``upstream`` if given); the number learned (applied now).

        ``event_id``: an event ``upstream``'s store committed in this process (the caller's own
        step): what must be handed off is everything up to it. When every route is past it,
        nothing is done; when the store kept every event between the routes' cursors and it (its
        own commits, contiguous in ``seq``), they are handed off from memory: no outbox read,
        and no verification (this process signed them and they never left it). Otherwise the
        outbox is read as without it."""
        applied = 0
        async with self._lock:
            for group in self._groups.values():
                if upstream is None or self.routes[group[0]].upstream.service == upstream:
                    done = None if event_id is None else await self._from_memory(group, event_id)
                    applied += await self._hand_off(group) if done is None else done
        return applied

    async def _from_memory(self, group: list[int], event_id: str) -> int | None:
        """The hand-off of ``group`` up to ``event_id`` from the events its upstream's store kept
        (the number applied), or None when they are not all there (read the outbox)."""
        upstream = self.routes[group[0]].upstream
        store = upstream.store
        seq = store.committed_seq(event_id) if id(upstream) in self._own else None
        if seq is None:
            return None
        cursors = {i: await self._cursor(i) for i in group}
        low = min(cursors.values())
        kept = store.committed_through(low, seq) if low < seq else []
        if kept is None:
            return None
        # and what this process committed since (requests waiting for the lock): one commit per
        # store for all of them, and nothing left for those requests to do
        kept += store.committed_after(max(seq, low))
        checked: list[tuple[StoredEvent, Checked]] = [(e, payload_of(e.jws)) for e in kept]
        applied = await self._deliver_all(group, cursors, checked)
        store.forget_committed(min(self._cursors[i] for i in group))
        return applied

    async def _hand_off(self, group: list[int]) -> int:
        """The routes of ``group`` (one upstream): its outbox read once after their lowest
        cursor, each event verified once, then learned by each route from its own cursor."""
        upstream = self.routes[group[0]].upstream
        applied = 0
        while True:
            cursors = {i: await self._cursor(i) for i in group}
            events = await upstream.store.events_after(min(cursors.values()), self.batch)
            if not events:
                return applied
            checked = [(event, _checked(event.jws, upstream)) for event in events]
            applied += await self._deliver_all(group, cursors, checked)
            if len(events) < self.batch:
                return applied

    async def _deliver_all(
        self, group: list[int], cursors: dict[int, int], checked: list[tuple[StoredEvent, Checked]]
    ) -> int:
        """Each route of ``group`` learns the events after its cursor; the routes to different
        downstream stores side by side (each store its own database, its own connection: a step
        waits for the slowest learn, not for the sum of the three), those to one store one after
        the other. Every route runs to its end whatever happens to another (a store that cannot
        be reached holds up only its own routes); the first failure is raised after all ended
        (the caller logs it, the sweep delivers later). The number applied."""
        chains: dict[int, list[tuple[int, list[tuple[StoredEvent, Checked]]]]] = {}
        for i in group:
            todo = [(event, claims) for event, claims in checked if event.seq > cursors[i]]
            if todo:
                chains.setdefault(id(self.routes[i].downstream), []).append((i, todo))

        async def chain(routes: list[tuple[int, list[tuple[StoredEvent, Checked]]]]) -> int:
            return sum([await self._deliver(i, todo) for i, todo in routes])

        if len(chains) <= 1:
            return sum([await chain(routes) for routes in chains.values()])
        outcomes = await asyncio.gather(
            *(chain(routes) for routes in chains.values()), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return sum(o for o in outcomes if isinstance(o, int))

    async def _cursor(self, i: int) -> int:
        if i not in self._cursors:
            route = self.routes[i]
            self._cursors[i] = await route.downstream.cursor(route.consumer)
            self._stored[i] = self._cursors[i]
        return self._cursors[i]

    async def _deliver(self, i: int, events: list[tuple[StoredEvent, Checked]]) -> int:
        """Learn ``events`` (verified, or refused) into route ``i``'s store, in one transaction
        (:meth:`TradeStore.learn_all`) that also moves the route's cursor past the last of them
        (or on its own when that did not move it, or when none was learned but one was refused).

        An event that does not concern the store (:func:`concerns`: a transition after its
        owner's last step) is passed over with nothing written. When none of the events is
        learned, the cursor moves in this process's memory only, and in the store once it is
        :attr:`batch` behind: the store's cursor is never ahead of what it learned, and another
        process (or this one after a restart) re-reads at most that many events and passes over
        them again."""
        route, last = self.routes[i], events[-1][0].seq
        downstream, name = route.downstream, route.downstream.service or "all"
        needed: list[tuple[StoredEvent, dict[str, Any]]] = []
        refused = False
        for event, claims in events:
            if event.seq <= self._cursors[i]:
                continue  # another process handed it off
            if isinstance(claims, EventRefused):
                refused = True
                LEARNED.labels(name, "refused").inc()
                log.error(
                    "reference_event_refused",
                    upstream=route.upstream.service,
                    downstream=downstream.service,
                    event_id=event.event_id,
                    error=str(claims),
                )
            elif self._needs(i, claims):
                needed.append((event, claims))
            else:
                LEARNED.labels(name, SKIPPED).inc()
        if not needed:
            if refused or last - self._stored[i] >= self.batch:
                self._cursors[i] = await downstream.advance(route.consumer, last)
                self._stored[i] = self._cursors[i]
            else:
                self._cursors[i] = max(self._cursors[i], last)
            return 0
        learning = [(claims, event.jws) for event, claims in needed]
        outcomes, self._cursors[i] = await downstream.learn_all(learning, route.consumer, last)
        self._stored[i] = self._cursors[i]
        for (event, _claims), outcome in zip(needed, outcomes, strict=True):
            LEARNED.labels(name, outcome).inc()
            if outcome == PENDING:
                log.info("reference_event_kept", downstream=name, event_id=event.event_id)
        return outcomes.count(APPLIED)

    def _needs(self, i: int, claims: dict[str, Any]) -> bool:
        return concerns(self.routes[i].downstream.service, claims)

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
