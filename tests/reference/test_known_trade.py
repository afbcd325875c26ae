"""An owner's step after its own previous step reads no trade (``TradeStore.last_known``): the
trade as the store object moved it shows the source state, and the transition's compare-and-set
decides. A trade another process (another store object on the same database) moved since is no
different from a read that went stale: the same 409 naming what happened, or, when the known
state is not the source, the read as before and the step taken."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.reference.conftest import ORDER, Mandates, World, caller
from trustplane.reference import machine
from trustplane.reference.services import TradeServices
from trustplane.reference.store import DuplicateTransition, Trade, TradeStore

ALLOC = [{"account": "SUB-1", "quantity": "1000"}]


def _counting_reads(store: TradeStore) -> list[str]:
    """The trade ids ``store.trade`` is asked for from now on."""
    asked: list[str] = []
    read = store.trade

    async def counted(trade_id: str) -> Trade:
        asked.append(trade_id)
        return await read(trade_id)

    store.trade = counted  # type: ignore[method-assign]
    return asked


@pytest.fixture
async def other(world: World) -> AsyncIterator[TradeServices]:
    """Another worker: its own store object (and pool) on the same database and event key."""
    store = TradeStore(type(world.store.db)(world.store.db.url), world.store.signer)
    yield TradeServices(store, Mandates())
    await store.db.dispose()


async def test_the_owners_next_step_reads_no_trade(world: World) -> None:
    s, pdp = world.services, world.pdp
    reads = _counting_reads(world.store)
    trade = await s.create_order(caller("alice", pdp), ORDER, "k-order")
    await s.execute(caller("broker", pdp), trade.trade_id, "k-exec")
    await s.propose_allocation(caller("alice", pdp), trade.trade_id, ALLOC, "k-prop")
    await s.approve_allocation(caller("bob", pdp), trade.trade_id, "k-appr")
    await s.submit_settlement(caller("clearing", pdp), trade.trade_id, {"ssi": "X"}, "k-sub")
    await s.confirm_settlement(caller("clearing", pdp), trade.trade_id, "settled", "k-conf")
    # propose and submit read (their own checks); execute, approve and confirm do not
    assert reads == [trade.trade_id, trade.trade_id]
    # the PDP still saw each step's source state, and the proposer for four eyes
    contexts = {action: context for action, _decision, context in pdp.decisions}
    assert contexts["trade:execute"]["trade_state"] == machine.CREATED
    assert contexts["trade:approve_allocation"]["trade_state"] == machine.ALLOCATION_PROPOSED
    assert contexts["trade:approve_allocation"]["proposer"] == "alice"
    assert contexts["trade:confirm_settlement"]["trade_state"] == machine.SETTLEMENT_SUBMITTED
    assert (await world.store.trade(trade.trade_id)).state == machine.SETTLED


async def test_four_eyes_holds_on_the_known_trade(world: World) -> None:
    s, pdp = world.services, world.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k-order")
    await s.execute(caller("broker", pdp), trade.trade_id, "k-exec")
    await s.propose_allocation(caller("alice", pdp), trade.trade_id, ALLOC, "k-prop")
    with pytest.raises(Exception, match="other than its proposer"):
        await s.approve_allocation(caller("alice", pdp), trade.trade_id, "k-appr")


async def _created_here_executed_there(world: World, other: TradeServices, key: str) -> Trade:
    """A trade created through ``world`` (known there as created), then executed by ``other``
    (another worker: ``world``'s remembered trade is now stale)."""
    pdp = world.pdp
    trade = await world.services.create_order(caller("alice", pdp), ORDER, "k-order")
    await other.execute(caller("broker", pdp), trade.trade_id, key)
    return trade


async def test_a_trade_moved_by_another_worker_is_refused_by_the_compare_and_set(
    world: World, other: TradeServices
) -> None:
    s, pdp = world.services, world.pdp
    trade = await _created_here_executed_there(world, other, "k-exec-1")
    with pytest.raises(DuplicateTransition) as refused:
        await s.execute(caller("broker2", pdp), trade.trade_id, "k-exec-2")
    assert refused.value.record.actor == "broker"  # names the first, as a read would have
    history = await world.store.history(trade.trade_id)
    assert [r.transition for r in history] == ["create", "execute"]


async def test_a_known_state_that_is_not_the_source_reads_the_store(
    world: World, other: TradeServices
) -> None:
    s, pdp = world.services, world.pdp
    trade = await _created_here_executed_there(world, other, "k-exec")
    await other.propose_allocation(caller("alice", pdp), trade.trade_id, ALLOC, "k-prop")
    record = await s.approve_allocation(caller("bob", pdp), trade.trade_id, "k-appr")
    assert record.target == machine.ALLOCATION_APPROVED
    assert world.store.last_known(trade.trade_id) is not None
    assert world.store.last_known(trade.trade_id).state == machine.ALLOCATION_APPROVED  # type: ignore[union-attr]


async def test_a_refused_transition_forgets_the_trade(world: World, other: TradeServices) -> None:
    s, pdp = world.services, world.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k-order")
    await other.execute(caller("broker", pdp), trade.trade_id, "k-exec-1")
    with pytest.raises(DuplicateTransition):
        await s.execute(caller("broker2", pdp), trade.trade_id, "k-exec-2")
    assert world.store.last_known(trade.trade_id) is None
