"""What each store learns (``machine.concerns``, docs/settlement.md "Learning upstream state"):
settlement and reporting every other owner's transition, execution and allocation only what their
own decisions read, the history through their last step. On SQLite and PostgreSQL: an event that
does not concern a store is skipped with nothing written, the cursor passes it without a commit of
its own (stored once a batch behind), an exception before an owner's last step still stops it, and
one after it never reaches it (nothing kept pending)."""

from __future__ import annotations

import pytest

from tests.reference.conftest import ISSUER, ORDER, SplitWorld, caller, upstreams
from tests.reference.test_handoff import Calls
from tests.reference.test_stores import to_approved
from trustplane.reference import machine
from trustplane.reference.handoff import LEARNS_FROM, Dispatcher, learn_verified
from trustplane.reference.services import Signal
from trustplane.reference.store import SKIPPED, OutOfOrder

E, A, S, R = machine.EXECUTION, machine.ALLOCATION, machine.SETTLEMENT, machine.REPORTING
CREATED, EXECUTED = machine.CREATED, machine.EXECUTED
PROPOSED, APPROVED = machine.ALLOCATION_PROPOSED, machine.ALLOCATION_APPROVED
SUBMITTED, EXCEPTION = machine.SETTLEMENT_SUBMITTED, machine.EXCEPTION


@pytest.mark.parametrize(
    ("service", "transition", "source", "target", "left", "learned"),
    [
        (A, "create", None, CREATED, None, True),
        (A, "execute", CREATED, EXECUTED, None, True),
        (E, "propose_allocation", EXECUTED, PROPOSED, None, False),
        (E, "approve_allocation", PROPOSED, APPROVED, None, False),
        (E, "submit_settlement", APPROVED, SUBMITTED, None, False),
        (A, "submit_settlement", APPROVED, SUBMITTED, None, False),
        (A, "settle", SUBMITTED, machine.SETTLED, None, False),
        (A, "amend#1", SUBMITTED, SUBMITTED, None, False),
        (E, "exception#1", CREATED, EXCEPTION, None, True),
        (E, "exception#1", EXECUTED, EXCEPTION, None, False),
        (A, "exception#1", EXECUTED, EXCEPTION, None, True),
        (A, "exception#2", PROPOSED, EXCEPTION, None, True),
        (A, "exception#1", APPROVED, EXCEPTION, None, False),
        (E, "reconsent#1", EXCEPTION, CREATED, None, True),
        (E, "reconsent#1", EXCEPTION, EXECUTED, None, False),
        (A, "reconsent#1", EXCEPTION, PROPOSED, None, True),
        (A, "reconsent#1", EXCEPTION, SUBMITTED, None, False),
        (E, "cancel", EXCEPTION, machine.CANCELLED, CREATED, True),
        (E, "cancel", EXCEPTION, machine.CANCELLED, EXECUTED, False),
        (A, "cancel", EXCEPTION, machine.CANCELLED, APPROVED, False),
        (A, "cancel", EXCEPTION, machine.CANCELLED, None, True),  # an older event: learned
        (A, "escalate#1", EXCEPTION, EXCEPTION, APPROVED, False),
        (E, "escalate#1", EXCEPTION, EXCEPTION, CREATED, True),
        (S, "approve_allocation", PROPOSED, APPROVED, None, True),
        (R, "settle", SUBMITTED, machine.SETTLED, None, True),
        (R, "cancel", EXCEPTION, machine.CANCELLED, SUBMITTED, True),
    ],
)
def test_which_transitions_a_store_learns(
    service: str,
    transition: str,
    source: str | None,
    target: str,
    left: str | None,
    learned: bool,
) -> None:
    assert machine.concerns(service, transition, source, target, left) is learned


def test_execution_learns_from_settlement_only() -> None:
    assert LEARNS_FROM[E] == (S,)
    assert set(LEARNS_FROM[A]) == {E, S}


async def test_an_event_after_the_owners_last_step_is_skipped_with_nothing_written(
    split: SplitWorld,
) -> None:
    trade_id = await to_approved(split)
    s, pdp, stores = split.services, split.pdp, split.stores
    await s.submit_settlement(caller("clearing", pdp), trade_id, {"ssi": "X"}, "k-sub")
    up = {u.service: u for u in upstreams(stores)}
    proposed = (await stores.allocation.events_after(0))[0]
    submitted = (await stores.settlement.events_after(0))[0]
    before = await stores.execution.history(trade_id)
    assert await learn_verified(stores.execution, proposed.jws, up[A]) == SKIPPED
    assert await learn_verified(stores.execution, submitted.jws, up[S]) == SKIPPED
    assert await learn_verified(stores.allocation, submitted.jws, up[S]) == SKIPPED
    assert await stores.execution.history(trade_id) == before
    assert await stores.execution.feed_after(0) == []  # no inbox row either
    assert (await stores.allocation.trade(trade_id)).state == APPROVED
    assert [e.event_id for e in await stores.reporting.feed_after(0)][-1] == submitted.event_id


async def test_skipped_events_move_the_cursor_without_a_commit_of_their_own(
    split: SplitWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settlement's steps after the approval concern neither execution nor allocation: their
    cursors pass them in memory, and in the store once a batch behind; a new dispatcher (another
    process, a restart) resumes from the stored cursor and skips them again."""
    s, pdp, stores = split.services, split.pdp, split.stores
    calls = Calls(monkeypatch)
    for service in (E, A, R):
        store = stores.by_service()[service]
        calls.count(store, "advance", f"{service} cursor alone")
        calls.count(store, "learn_through", f"{service} learned")
    trades = [await to_approved(split) for _ in range(3)]
    calls.take()
    for trade_id in trades:  # handed off by the services' dispatcher (a batch of 100)
        await s.submit_settlement(caller("clearing", pdp), trade_id, {"ssi": "X"}, "k-sub")
        await s.confirm_settlement(caller("clearing", pdp), trade_id, "settled", "k-conf")
    # one learning transaction per event, reporting's only (its cursor made the first time)
    assert calls.take() == {"reporting learned": 6, "reporting cursor alone": 1}
    settlement = upstreams(stores)[2]
    consumer = f"settlement@{settlement.issuer}"
    events = await stores.settlement.events_after(0)
    assert len(events) == 6
    for store in (stores.execution, stores.allocation):
        assert await store.cursor(consumer) == 0  # never written: nothing was learned
    assert await stores.reporting.cursor(consumer) == events[-1].seq
    assert await split.dispatcher.hand_off(machine.SETTLEMENT) == 0  # its memory: past them all
    assert calls.take() == {}
    # another process resumes from the stored cursors: skips again, stores a batch's worth
    other = Dispatcher.between(stores.by_service(), [settlement], batch=4)
    assert await other.hand_off(machine.SETTLEMENT) == 0
    assert calls.take() == {"execution cursor alone": 1, "allocation cursor alone": 1}
    for store in (stores.execution, stores.allocation):
        assert await store.cursor(consumer) == events[3].seq
    again = Dispatcher.between(stores.by_service(), [settlement], batch=4)
    assert await again.hand_off(machine.SETTLEMENT) == 0
    assert calls.take() == {}
    for trade_id in trades:
        assert (await stores.execution.trade(trade_id)).state == EXECUTED
        assert (await stores.allocation.trade(trade_id)).state == APPROVED
        assert (await stores.reporting.trade(trade_id)).state == machine.SETTLED
    for store in stores.distinct():
        assert await store.pending() == []


async def test_an_exception_before_execution_still_stops_execution(split: SplitWorld) -> None:
    s, pdp, stores = split.services, split.pdp, split.stores
    trade = await s.create_order(caller("alice", pdp), ORDER, "k")
    signal = Signal(ISSUER, "set-1", "session-revoked", "mandate_revoked", "", mandate_id="M-1")
    (raised,) = await s.raise_on_signal(signal)
    assert raised.from_state == CREATED
    for store in stores.distinct():
        assert (await store.trade(trade.trade_id)).state == EXCEPTION
    with pytest.raises(OutOfOrder) as refused:
        await s.execute(caller("broker", pdp), trade.trade_id, "k")
    assert refused.value.state == EXCEPTION
    # its cancellation names the state the exception left: execution learns it too
    await s.resolve_exception(caller("ops", pdp), raised.exception_id, "cancel")
    for store in stores.distinct():
        assert (await store.trade(trade.trade_id)).state == machine.CANCELLED
        assert await store.pending() == []


async def test_an_exception_after_the_approval_reaches_neither_upstream_owner(
    split: SplitWorld,
) -> None:
    s, pdp, stores = split.services, split.pdp, split.stores
    trade_id = await to_approved(split)
    signal = Signal(ISSUER, "set-1", "session-revoked", "mandate_revoked", "", mandate_id="M-1")
    (raised,) = await s.raise_on_signal(signal)
    assert raised.from_state == APPROVED
    await s.resolve_exception(caller("ops", pdp), raised.exception_id, "escalate")
    await s.resolve_exception(caller("ops", pdp), raised.exception_id, "cancel")
    assert (await stores.execution.trade(trade_id)).state == EXECUTED
    assert (await stores.allocation.trade(trade_id)).state == APPROVED
    for store in (stores.settlement, stores.reporting):
        assert (await store.trade(trade_id)).state == machine.CANCELLED
    for store in stores.distinct():
        assert await store.pending() == []  # nothing kept waiting for a predecessor
    # the upstream owners' answers did not change: their steps are done
    with pytest.raises(Exception, match="approve_allocation"):
        await s.approve_allocation(caller("carol", pdp), trade_id, "k-again")
