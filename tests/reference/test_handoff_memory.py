"""The hand-off of a process's own commits from memory (reference/handoff.py,
``Dispatcher.hand_off(..., event_id=)``), on PostgreSQL, where the owner's transition is one
statement that returns its event's outbox ``seq``: a step's event, and the events this process
committed just before it, are learned by the other stores without reading the owner's outbox back
and without verifying what this process signed; nothing is skipped when the outbox holds an
event this process did not commit (another process's, a gap), and an upstream whose JWKS does not
publish the store's key is never trusted from memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.reference.conftest import (
    EVENTS_ISSUER,
    ORDER,
    SplitWorld,
    caller,
    held,
    split_world,
)
from tests.reference.test_handoff import Calls
from trustplane.reference import handoff, machine
from trustplane.reference.events import Envelope, EventSigner
from trustplane.reference.handoff import Dispatcher, Upstream
from trustplane.reference.store import TradeStore
from trustplane.storage.db import Database

pytestmark = pytest.mark.postgres
ENVELOPE = Envelope("txn-1", "alice", "desk-app")
DOWNSTREAM = (machine.ALLOCATION, machine.SETTLEMENT, machine.REPORTING)
ALLOC = [{"account": "SUB-1", "quantity": "1000"}]


@pytest.fixture
async def pg_split(pg_service_databases: dict[str, str]) -> AsyncIterator[SplitWorld]:
    async with split_world(pg_service_databases) as world:
        yield world


def count_reads(split: SplitWorld, monkeypatch: pytest.MonkeyPatch) -> Calls:
    calls = Calls(monkeypatch)
    calls.count(handoff, "verify_event", "verify")
    for service in machine.OWNERS:
        calls.count(split.stores.by_service()[service], "events_after", f"{service} outbox read")
    return calls


async def created(store: TradeStore, trade_id: str) -> str:
    _trade, record = await store.create(trade_id, ORDER, "alice", ENVELOPE, None)
    return record.event_id


async def test_a_step_s_own_events_are_handed_off_from_memory(
    pg_split: SplitWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores, dispatcher = pg_split.stores, pg_split.dispatcher
    # the first hand-off may read (the outbox's seq need not start after the cursors)
    await dispatcher.hand_off(machine.EXECUTION, event_id=await created(stores.execution, "t-1"))
    calls = count_reads(pg_split, monkeypatch)
    await created(stores.execution, "t-2")
    last = await created(stores.execution, "t-3")
    # both commits of this process, contiguous after the cursors: learned from memory
    assert await dispatcher.hand_off(machine.EXECUTION, event_id=last) == 6
    assert calls.take() == {}
    # every route is past t-2's event already: nothing to do, nothing read
    assert await dispatcher.hand_off(machine.EXECUTION, event_id=last) == 0
    assert calls.take() == {}
    consumer = f"execution@{EVENTS_ISSUER}"
    seq = (await stores.execution.events_after(0))[-1].seq
    for service in DOWNSTREAM:
        store = stores.by_service()[service]
        assert await store.cursor(consumer) == seq, service
        for trade_id in ("t-1", "t-2", "t-3"):
            assert [r.transition for r in await store.history(trade_id)] == ["create"]
        assert [e.trade_id for e in await store.feed_after(0)] == ["t-1", "t-2", "t-3"]


async def test_what_was_committed_while_a_hand_off_waited_goes_with_it(
    pg_split: SplitWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's hand-off takes the events this process committed after its own as well (the
    requests waiting for the dispatcher's lock): one learning statement per store for all of
    them, and nothing left to do for those requests."""
    stores, dispatcher = pg_split.stores, pg_split.dispatcher
    await dispatcher.hand_off(machine.EXECUTION, event_id=await created(stores.execution, "t-1"))
    calls = count_reads(pg_split, monkeypatch)
    for service in DOWNSTREAM:
        calls.count(stores.by_service()[service], "learn_all", f"{service} learned")
    first = await created(stores.execution, "t-2")
    second = await created(stores.execution, "t-3")
    assert await dispatcher.hand_off(machine.EXECUTION, event_id=first) == 6
    assert calls.take() == {f"{service} learned": 1 for service in DOWNSTREAM}
    assert await dispatcher.hand_off(machine.EXECUTION, event_id=second) == 0
    assert calls.take() == {}
    for service in DOWNSTREAM:
        store = stores.by_service()[service]
        assert [e.trade_id for e in await store.feed_after(0)] == ["t-1", "t-2", "t-3"]


async def test_a_lifecycle_through_the_services_reads_no_outbox_back(
    pg_split: SplitWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, pdp, stores = pg_split.services, pg_split.pdp, pg_split.stores
    first = await s.create_order(caller("alice", pdp), ORDER, "k-0")  # may read: first hand-off
    await s.execute(caller("alice", pdp), first.trade_id, "k-1")
    await s.propose_allocation(caller("alice", pdp), first.trade_id, ALLOC, "k-2")
    await s.approve_allocation(caller("bob", pdp), first.trade_id, "k-3")
    await s.submit_settlement(caller("clearing", pdp), first.trade_id, {"ssi": "X"}, "k-4")
    calls = count_reads(pg_split, monkeypatch)
    trade = await s.create_order(caller("alice", pdp), ORDER, "k-5")
    await s.execute(caller("alice", pdp), trade.trade_id, "k-6")
    await s.propose_allocation(caller("alice", pdp), trade.trade_id, ALLOC, "k-7")
    await s.approve_allocation(caller("bob", pdp), trade.trade_id, "k-8")
    await s.submit_settlement(caller("clearing", pdp), trade.trade_id, {"ssi": "X"}, "k-9")
    await s.confirm_settlement(caller("clearing", pdp), trade.trade_id, "settled", "k-10")
    assert calls.take() == {}
    names = ["create"] + [t.name for t in machine.PATH]
    for service, store in stores.by_service().items():
        history = [r.transition for r in await store.history(trade.trade_id)]
        assert history == held(service, names), service
    feed = await s.events(0, 0)
    assert len(feed) == 11  # every event of both trades, each once


async def test_an_event_this_process_did_not_commit_is_read_not_skipped(
    pg_split: SplitWorld, pg_service_databases: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stores, dispatcher = pg_split.stores, pg_split.dispatcher
    await dispatcher.hand_off(machine.EXECUTION, event_id=await created(stores.execution, "t-1"))
    # another process on the execution database (same key) commits between two of ours
    other = TradeStore(
        Database(pg_service_databases[machine.EXECUTION]),
        stores.execution.signer,
        service=machine.EXECUTION,
    )
    try:
        await created(other, "t-2")
    finally:
        await other.db.dispose()
    last = await created(stores.execution, "t-3")
    calls = count_reads(pg_split, monkeypatch)
    assert await dispatcher.hand_off(machine.EXECUTION, event_id=last) == 6
    assert calls.take() == {"execution outbox read": 1, "verify": 2}
    for service in DOWNSTREAM:
        store = stores.by_service()[service]
        assert [e.trade_id for e in await store.feed_after(0)] == ["t-1", "t-2", "t-3"]


async def test_an_upstream_not_publishing_the_store_s_key_is_verified_from_the_outbox(
    pg_split: SplitWorld,
) -> None:
    """The dispatcher's upstream names another key than the one its store signs with: the
    store's own commits are not trusted from memory, they are read and refused."""
    stores = pg_split.stores
    stranger = EventSigner.generate(EVENTS_ISSUER)
    upstream = Upstream(machine.EXECUTION, stores.execution, EVENTS_ISSUER, stranger.jwks())
    dispatcher = Dispatcher.between(stores.by_service(), [upstream])
    event_id = await created(stores.execution, "t-1")
    assert await dispatcher.hand_off(machine.EXECUTION, event_id=event_id) == 0
    for service in DOWNSTREAM:
        store: Any = stores.by_service()[service]
        assert await store.history("t-1") == [], service
        assert await store.feed_after(0) == [], service
