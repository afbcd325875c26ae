"""Racing duplicate transitions on PostgreSQL (and SQLite): of N concurrent attempts at one
transition, exactly one wins; every other is refused 409-style, naming the winner's transition.
With each service on its own store: exactly one wins per owning service, and racing learns of the
same upstream event apply it once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.reference.conftest import (
    LAST_STEP,
    ORDER,
    SplitWorld,
    World,
    caller,
    upstreams,
)
from trustplane.reference import machine
from trustplane.reference.handoff import Dispatcher, learn_verified
from trustplane.reference.store import APPLIED, KNOWN, DuplicateTransition, OutOfOrder

RACERS = 16


async def test_racing_duplicate_transitions_exactly_one_wins(world: World) -> None:
    s, pdp = world.services, world.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k")
    await s.execute(caller("b", pdp), trade.trade_id, "k")
    await s.propose_allocation(
        caller("a", pdp), trade.trade_id, [{"account": "S", "quantity": "1000"}], "k"
    )
    await s.approve_allocation(caller("b", pdp), trade.trade_id, "k")

    async def submit(i: int) -> str:
        try:
            await s.submit_settlement(caller(f"c{i}", pdp), trade.trade_id, {"n": i}, f"key-{i}")
        except DuplicateTransition as exc:
            return f"duplicate {exc.record.transition}"
        except OutOfOrder as exc:
            return f"out-of-order {exc.state}"
        return "won"

    outcomes = await asyncio.gather(*(submit(i) for i in range(RACERS)))
    assert outcomes.count("won") == 1, outcomes
    refused = {"duplicate submit_settlement", f"out-of-order {machine.SETTLEMENT_SUBMITTED}"}
    assert sum(o in refused for o in outcomes) == RACERS - 1, outcomes
    history = await world.store.history(trade.trade_id)
    assert [r.transition for r in history].count("submit_settlement") == 1
    events = [e.type for e in await world.store.events_after(0)]
    assert events.count("settlement.submitted") == 1

    # and the two outcomes racing each other: one of settled / failed, never both
    async def confirm(i: int) -> bool:
        outcome = "settled" if i % 2 else "failed"
        try:
            await s.confirm_settlement(caller("c", pdp), trade.trade_id, outcome, f"c-{i}")
        except (DuplicateTransition, OutOfOrder):
            return False
        return True

    assert sum(await asyncio.gather(*(confirm(i) for i in range(RACERS)))) == 1
    assert (await world.store.trade(trade.trade_id)).state in (machine.SETTLED, machine.FAILED)


async def test_each_owner_lets_exactly_one_racer_win(split: SplitWorld) -> None:
    """Each service with its own store: racing duplicates of an owner's transition (execution's
    execute, allocation's approve, settlement's submit and outcome) are decided by that owner's
    compare-and-set and constraint alone: exactly one wins, the losers are told what happened."""
    s, pdp = split.services, split.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k")
    trade_id = trade.trade_id

    async def race(step: Callable[[int], Awaitable[object]]) -> list[str]:
        async def one(i: int) -> str:
            try:
                await step(i)
            except DuplicateTransition as exc:
                return f"duplicate {exc.record.transition}"
            except OutOfOrder as exc:
                return f"out-of-order {exc.state}"
            return "won"

        return list(await asyncio.gather(*(one(i) for i in range(RACERS))))

    for step in (
        lambda i: s.execute(caller(f"b{i}", pdp), trade_id, f"e-{i}"),
        lambda i: s.propose_allocation(
            caller("alice", pdp), trade_id, [{"account": "S", "quantity": "1000"}], f"p-{i}"
        ),
        lambda i: s.approve_allocation(caller(f"a{i}", pdp), trade_id, f"a-{i}"),
        lambda i: s.submit_settlement(caller(f"c{i}", pdp), trade_id, {"n": i}, f"s-{i}"),
        lambda i: s.confirm_settlement(
            caller("c", pdp), trade_id, "settled" if i % 2 else "failed", f"c-{i}"
        ),
    ):
        outcomes = await race(step)
        assert outcomes.count("won") == 1, outcomes
        assert all(o.startswith(("duplicate", "out-of-order")) for o in outcomes if o != "won")
    for service, store in split.stores.by_service().items():
        history = await store.history(trade_id)
        names = [r.transition for r in history]
        # execution and allocation hold the history through their own last step
        expected = {machine.EXECUTION: 2, machine.ALLOCATION: 4}.get(service, 6)
        assert len(names) == len(set(names)) == expected, (service, names)
        if service not in LAST_STEP:
            assert (await store.trade(trade_id)).state in (machine.SETTLED, machine.FAILED)
    for service in machine.OWNERS:
        events = await split.stores.by_service()[service].events_after(0)
        assert len(events) == 2  # one event per owned transition, whoever raced


async def test_racing_learns_of_one_event_apply_it_once(split: SplitWorld) -> None:
    plain = type(split.services)(split.stores, split.mandates)
    trade = await plain.create_order(caller("alice", split.pdp), ORDER, "k")
    (created,) = await split.stores.execution.events_after(0)
    execution = upstreams(split.stores)[0]
    outcomes = await asyncio.gather(
        *(learn_verified(split.stores.allocation, created.jws, execution) for _ in range(RACERS))
    )
    assert outcomes.count(APPLIED) == 1, outcomes
    assert outcomes.count(KNOWN) == RACERS - 1, outcomes
    history = await split.stores.allocation.history(trade.trade_id)
    assert [r.transition for r in history] == ["create"]
    assert len(await split.stores.allocation.feed_after(0)) == 1
    # and racing dispatchers (two processes' sweeps) hand each event over once
    first = Dispatcher.between(split.stores.by_service(), upstreams(split.stores))
    second = Dispatcher.between(split.stores.by_service(), upstreams(split.stores))
    await asyncio.gather(first.hand_off(), second.hand_off(), first.hand_off())
    for store in (split.stores.settlement, split.stores.reporting):
        assert [r.transition for r in await store.history(trade.trade_id)] == ["create"]
