"""What one hand-off does (reference/handoff.py, ``Dispatcher``), on SQLite and PostgreSQL: the
upstream's outbox read once for all its routes, each event verified once, each route's cursor
kept in memory and moved in the transaction that learns the route's last event; the downstream
store's cursor stays the truth when another dispatcher moved it further; nothing is weakened (a
refused event is refused on every route, never applied)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tests.reference.conftest import EVENTS_ISSUER, ORDER, SplitWorld, upstreams
from tests.reference.test_commit_order import (  # the fixture: slowed commits reach store_pg too
    slow_commits,
    statements_held_with_transactions,  # noqa: F401
)
from trustplane.reference import handoff, machine
from trustplane.reference.events import Envelope, EventSigner
from trustplane.reference.handoff import Dispatcher, Upstream, learn_verified
from trustplane.reference.store import NotFound, TradeStore

ENVELOPE = Envelope("txn-1", "alice", "desk-app")
DOWNSTREAM = (machine.ALLOCATION, machine.SETTLEMENT, machine.REPORTING)
#: The racing test: trades whose two events are learned at once, in shuffled order.
TRADES = 24


class Calls:
    """Counts the calls of the methods it wraps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: dict[str, int] = {}
        self._monkeypatch = monkeypatch

    def count(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[label] = self.counts.get(label, 0) + 1
            return original(*args, **kwargs)

        self._monkeypatch.setattr(owner, name, counted)

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


async def create(store: TradeStore, trade_id: str) -> None:
    await store.create(trade_id, ORDER, "alice", ENVELOPE, None)


def from_execution(split: SplitWorld) -> Dispatcher:
    return Dispatcher.between(split.stores.by_service(), upstreams(split.stores)[:1])


async def test_one_read_and_one_verification_per_event_for_every_route(
    split: SplitWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores, dispatcher = split.stores, from_execution(split)
    calls = Calls(monkeypatch)
    calls.count(handoff, "verify_event", "verify")
    calls.count(stores.execution, "events_after", "outbox read")
    for service in DOWNSTREAM:
        store = stores.by_service()[service]
        calls.count(store, "cursor", "cursor read")
        calls.count(store, "advance", "cursor moved alone")
    await create(stores.execution, "t-1")
    await create(stores.execution, "t-2")
    assert await dispatcher.hand_off(machine.EXECUTION) == 6  # 2 events x 3 stores
    # the first time: each cursor read once, and made (no row to move yet)
    assert calls.take() == {
        "cursor read": 3, "outbox read": 1, "verify": 2, "cursor moved alone": 3,
    }  # fmt: skip
    await create(stores.execution, "t-3")
    assert await dispatcher.hand_off(machine.EXECUTION) == 3
    # then: the cursors from memory, moved by the learning transactions
    assert calls.take() == {"outbox read": 1, "verify": 1}
    assert await dispatcher.hand_off(machine.EXECUTION) == 0
    assert calls.take() == {"outbox read": 1}
    last = (await stores.execution.events_after(0))[-1].seq
    consumer = f"execution@{EVENTS_ISSUER}"
    for service in DOWNSTREAM:
        store = stores.by_service()[service]
        assert await store.cursor(consumer) == last, service
        assert [r.transition for r in await store.history("t-3")] == ["create"]


def learning_side_by_side(
    stores: dict[str, TradeStore], monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Wrap the downstream stores' learns: each yields once to the loop inside; the returned list
    gets the number of learns in flight at each entry."""
    in_flight, seen = [0], []
    for store in stores.values():
        for name in ("learn", "learn_through"):
            original = getattr(store, name)

            async def learning(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                in_flight[0] += 1
                seen.append(in_flight[0])
                try:
                    await asyncio.sleep(0)
                    return await _original(*args, **kwargs)
                finally:
                    in_flight[0] -= 1

            monkeypatch.setattr(store, name, learning)
    return seen


async def test_the_routes_to_different_stores_learn_side_by_side(
    split: SplitWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step waits for the slowest of its three learns, not for their sum: the routes to the
    three downstream stores are in flight together (one after the other before: at most one)."""
    stores, dispatcher = split.stores, from_execution(split)
    downstream = {s: stores.by_service()[s] for s in DOWNSTREAM}
    seen = learning_side_by_side(downstream, monkeypatch)
    await create(stores.execution, "t-1")
    assert await dispatcher.hand_off(machine.EXECUTION) == 3
    assert max(seen) == 3
    for store in downstream.values():
        assert [r.transition for r in await store.history("t-1")] == ["create"]


async def test_a_store_that_fails_holds_up_only_its_own_route(
    split: SplitWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One downstream store failing: the others learn the event all the same, the failure is
    raised after them (the service logs it; its cursor did not move, so the sweep delivers it)."""
    stores, dispatcher = split.stores, from_execution(split)
    consumer = f"execution@{EVENTS_ISSUER}"

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("the allocation store is down")

    monkeypatch.setattr(stores.allocation, "learn_through", down)
    await create(stores.execution, "t-1")
    with pytest.raises(ConnectionError):
        await dispatcher.hand_off(machine.EXECUTION)
    for service in (machine.SETTLEMENT, machine.REPORTING):
        store = stores.by_service()[service]
        assert [r.transition for r in await store.history("t-1")] == ["create"], service
    with pytest.raises(NotFound):
        await stores.allocation.trade("t-1")
    monkeypatch.undo()
    assert await dispatcher.hand_off(machine.EXECUTION) == 1  # the sweep's retry: allocation only
    assert [r.transition for r in await stores.allocation.history("t-1")] == ["create"]
    last = (await stores.execution.events_after(0))[-1].seq
    for service in DOWNSTREAM:
        assert await stores.by_service()[service].cursor(consumer) == last, service


async def test_the_store_s_cursor_is_the_truth_when_another_dispatcher_moved_it(
    split: SplitWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes handing off one upstream: each keeps its own idea of the cursors; the one
    behind re-reads what the other handed off (a redelivery, known), takes the store's cursor,
    and never skips an event."""
    stores = split.stores
    first, second = from_execution(split), from_execution(split)
    await create(stores.execution, "t-1")
    assert await first.hand_off() == 3
    await create(stores.execution, "t-2")
    assert await second.hand_off() == 3  # first's memory is now behind the stores' cursors
    await create(stores.execution, "t-3")
    calls = Calls(monkeypatch)
    calls.count(stores.reporting, "learn_all", "learn")
    assert await first.hand_off() == 3  # t-3; t-2 was known, not applied again
    assert calls.take() == {"learn": 1}  # t-2, known, and t-3 with the cursor: together
    assert await first.hand_off() == 0
    assert await second.hand_off() == 0  # t-3 is known everywhere: nothing applied twice
    consumer = f"execution@{EVENTS_ISSUER}"
    last = (await stores.execution.events_after(0))[-1].seq
    for service in DOWNSTREAM:
        store = stores.by_service()[service]
        assert await store.cursor(consumer) == last
        assert len(await store.feed_after(0)) == 3
        for trade_id in ("t-1", "t-2", "t-3"):
            assert [r.transition for r in await store.history(trade_id)] == ["create"]


async def test_an_event_refused_is_refused_on_every_route_and_passed(split: SplitWorld) -> None:
    """An outbox row that does not verify with the upstream's key (here: signed by another key)
    is applied nowhere; the cursors move past it and the next event is learned."""
    stores = split.stores
    stranger = EventSigner.generate(EVENTS_ISSUER)
    posing = Upstream(machine.EXECUTION, stores.execution, EVENTS_ISSUER, stranger.jwks())
    refusing = Dispatcher.between(stores.by_service(), [posing])
    await create(stores.execution, "t-1")
    assert await refusing.hand_off() == 0
    (event,) = await stores.execution.events_after(0)
    for service in DOWNSTREAM:
        store = stores.by_service()[service]
        with pytest.raises(NotFound):
            await store.trade("t-1")
        assert await store.feed_after(0) == []  # not even kept
        assert await store.cursor(f"execution@{EVENTS_ISSUER}") == event.seq  # and passed


async def test_racing_learns_out_of_order_leave_nothing_kept(split: SplitWorld) -> None:
    """A trade's ``create`` and ``execute`` learned at once by one store, in both orders, for
    many trades, committing in shuffled order: an event kept for its predecessor is always applied
    (by its own delivery's second look or by the predecessor's), nothing stays kept."""
    stores, learners = split.stores, asyncio.Semaphore(8)
    execution, reporting = stores.execution, stores.reporting
    upstream = upstreams(stores)[0]
    for i in range(TRADES):
        await create(execution, f"t-{i}")
        await execution.apply(f"t-{i}", machine.EXECUTE, "broker", ENVELOPE, None)
    events = await execution.events_after(0, 10_000)
    slow_commits(reporting.db, 3)

    async def learn(jws: str) -> None:
        async with learners:
            await learn_verified(reporting, jws, upstream)

    shuffled = random.Random(4).sample(events, len(events))
    await asyncio.gather(*(learn(e.jws) for e in shuffled))
    assert await reporting.pending() == []
    for i in range(TRADES):
        assert (await reporting.trade(f"t-{i}")).state == machine.EXECUTED
