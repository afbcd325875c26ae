"""Racing duplicate transitions on PostgreSQL (and SQLite): of N concurrent attempts at one
transition, exactly one wins; every other is refused 409-style, naming the winner's transition."""

from __future__ import annotations

import asyncio

from tests.reference.conftest import ORDER, World, caller
from trustplane.reference import machine
from trustplane.reference.store import DuplicateTransition, OutOfOrder

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
