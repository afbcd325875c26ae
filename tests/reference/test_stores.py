"""Each service with its own store (docs/settlement.md, "Stores"), on SQLite and PostgreSQL: every
owner decides its own transitions (its compare-and-set, its unique constraint, its outbox), the
others learn them from its verified events (inbox, same compare-and-set, actor ``event:<iss>``),
handed off before the call returns; a tampered event or one of an unknown issuer is refused and
nothing applied; an event ahead of its predecessor is kept and applied when the predecessor
arrives; an exception raised at settlement stops the upstream owners' next step until resolved."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from tests.reference.conftest import (
    EVENTS_ISSUER,
    ISSUER,
    ORDER,
    SplitWorld,
    caller,
    upstreams,
)
from trustplane.reference import machine
from trustplane.reference.events import Envelope, EventRefused, EventSigner
from trustplane.reference.handoff import Dispatcher, Upstream, learn_verified
from trustplane.reference.services import Refused, Signal
from trustplane.reference.store import (
    APPLIED,
    KNOWN,
    PENDING,
    DuplicateTransition,
    NotFound,
    NotOwned,
    OutOfOrder,
    TradeStore,
    create_safely,
)
from trustplane.storage.db import Database

ALLOC = [{"account": "SUB-1", "quantity": "600"}, {"account": "SUB-2", "quantity": "400"}]


async def to_approved(w: SplitWorld) -> str:
    s, pdp = w.services, w.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k-order")
    await s.execute(caller("broker", pdp), trade.trade_id, "k-exec")
    await s.propose_allocation(caller("alice", pdp), trade.trade_id, ALLOC, "k-prop")
    await s.approve_allocation(caller("bob", pdp), trade.trade_id, "k-appr")
    return trade.trade_id


async def test_each_owner_decides_its_own_and_learns_the_others(split: SplitWorld) -> None:
    trade_id = await to_approved(split)
    s, pdp, stores = split.services, split.pdp, split.stores
    await s.submit_settlement(caller("clearing", pdp), trade_id, {"ssi": "X"}, "k-sub")
    await s.confirm_settlement(caller("clearing", pdp), trade_id, "settled", "k-conf")

    # each owner's outbox holds its own events only, signed with its own key
    own = {
        machine.EXECUTION: ["order.created", "trade.executed"],
        machine.ALLOCATION: ["allocation.proposed", "allocation.approved"],
        machine.SETTLEMENT: ["settlement.submitted", "settlement.settled"],
    }
    keys = set()
    for service, types in own.items():
        store = stores.by_service()[service]
        events = await store.events_after(0)
        assert [e.type for e in events] == types
        key = jwt.PyJWK(store.signer.jwks()["keys"][0])
        for event in events:
            jwt.decode(event.jws, key.key, algorithms=["ES256"])  # an independent library
        keys.add(store.signer.kid)
    assert len(keys) == 3  # three keys
    assert await stores.reporting.events_after(0) == []  # reporting writes no event

    # settlement and reporting know the whole history, execution and allocation the history
    # through their own last step (what their decisions read); the others' steps were learned
    names = ["create"] + [t.name for t in machine.PATH]
    through = {
        machine.EXECUTION: (["create", "execute"], machine.EXECUTED),
        machine.ALLOCATION: (names[:4], machine.ALLOCATION_APPROVED),
    }
    for service, store in stores.by_service().items():
        history = await store.history(trade_id)
        expected, state = through.get(service, (names, machine.SETTLED))
        assert [r.transition for r in history] == expected, service
        assert (await store.trade(trade_id)).state == state
        for record in history:
            owned = machine.owner(record.transition) == service
            assert record.actor.startswith("event:") != owned, (service, record)
            if not owned:
                assert record.actor == f"event:{EVENTS_ISSUER}"
                assert record.idempotency_key is None
    learned = (await stores.settlement.trade(trade_id)).allocation
    assert learned == ALLOC  # the projection carries what the upstream decided
    # reporting's feed: every owner's event, in the order it learned them
    feed = await s.events(0, 0)
    assert [e.type for e in feed] == [t for ts in own.values() for t in ts]
    report = await s.report(trade_id)
    assert [t["transition"] for t in report["transitions"]] == names


async def test_a_duplicate_is_refused_for_ever_by_its_owner(split: SplitWorld) -> None:
    trade_id = await to_approved(split)
    s, pdp = split.services, split.pdp
    with pytest.raises(DuplicateTransition) as dup:
        await s.execute(caller("broker", pdp), trade_id, "another-key")
    assert dup.value.record.transition == "execute"
    assert dup.value.record.idempotency_key == "k-exec"
    with pytest.raises(DuplicateTransition) as again:
        await s.approve_allocation(caller("carol", pdp), trade_id, "k-new")
    assert again.value.record.actor == "bob"
    # an owner never applies (nor learns) what it does not own
    envelope = Envelope("txn-1", "x", "c")
    with pytest.raises(NotOwned, match="does not own submit_settlement"):
        await split.stores.allocation.apply(trade_id, machine.SUBMIT, "x", envelope, None)
    with pytest.raises(NotOwned):
        await split.stores.reporting.create("t", ORDER, "x", envelope, None)


async def test_a_step_whose_predecessor_was_not_learned_is_out_of_order(
    split: SplitWorld,
) -> None:
    s, pdp, stores = split.services, split.pdp, split.stores
    no_handoff = type(s)(stores, split.mandates)  # nothing delivered unless asked
    trade = await no_handoff.create_order(caller("alice", pdp), ORDER, "k")
    await no_handoff.execute(caller("b", pdp), trade.trade_id, "k")
    with pytest.raises(Refused) as missing:  # allocation has not learned the trade yet
        await no_handoff.propose_allocation(caller("a", pdp), trade.trade_id, ALLOC, "k")
    assert missing.value.code == "not-found"
    assert await split.dispatcher.hand_off(machine.EXECUTION) == 6  # 2 events x 3 stores
    await no_handoff.propose_allocation(caller("a", pdp), trade.trade_id, ALLOC, "k")
    with pytest.raises(OutOfOrder) as early:  # settlement: still executed
        await no_handoff.submit_settlement(caller("c", pdp), trade.trade_id, {}, "k")
    assert (early.value.state, early.value.expected) == (
        machine.EXECUTED,
        machine.ALLOCATION_APPROVED,
    )
    assert split.mandates.asked == 0  # refused before any mandate question


async def test_a_tampered_event_or_an_unknown_issuer_is_refused_and_nothing_applied(
    split: SplitWorld,
) -> None:
    stores = split.stores
    plain = type(split.services)(stores, split.mandates)
    trade = await plain.create_order(caller("alice", split.pdp), ORDER, "k")
    event = (await stores.execution.events_after(0))[0]
    execution = upstreams(stores)[0]
    head, payload, sig = event.jws.split(".")
    forged_payload = jwt.api_jws.base64url_encode(
        jwt.api_jws.base64url_decode(payload).replace(b'"buy"', b'"sell"')
    ).decode()
    with pytest.raises(EventRefused) as tampered:
        await learn_verified(stores.allocation, f"{head}.{forged_payload}.{sig}", execution)
    assert str(tampered.value) == "the signature does not verify with the publisher's keys"
    # a well-signed event of another issuer (its key offered as the upstream's) is refused too
    stranger = EventSigner.generate("https://stranger.example")
    _id, foreign = stranger.sign(
        "order.created", trade.trade_id, "create", machine.CREATED, Envelope(None, None, None),
        dict(ORDER),
    )  # fmt: skip
    posing = Upstream(machine.EXECUTION, stores.execution, EVENTS_ISSUER, stranger.jwks())
    with pytest.raises(EventRefused) as unknown:
        await learn_verified(stores.allocation, foreign, posing)
    assert str(unknown.value) == "wrong issuer or no event id"
    # and the right issuer's event under a key that is not the upstream's
    with pytest.raises(EventRefused):
        await learn_verified(stores.allocation, event.jws, posing)
    # an owner's event claiming a transition another service owns
    allocation_up = upstreams(stores)[1]
    impostor = Upstream(machine.ALLOCATION, stores.execution, EVENTS_ISSUER, execution.jwks)
    with pytest.raises(EventRefused) as not_its_own:
        await learn_verified(stores.allocation, event.jws, impostor)
    assert str(not_its_own.value) == "allocation does not own create"
    assert allocation_up.service == machine.ALLOCATION
    for store in (stores.allocation, stores.settlement, stores.reporting):
        with pytest.raises(NotFound):
            await store.trade(trade.trade_id)
        assert await store.feed_after(0) == []  # not even kept
    # the genuine event is learned (and a redelivery is a no-op)
    assert await learn_verified(stores.allocation, event.jws, execution) == APPLIED
    assert await learn_verified(stores.allocation, event.jws, execution) == KNOWN
    assert (await stores.allocation.trade(trade.trade_id)).side == "buy"


async def test_an_event_ahead_of_its_predecessor_is_applied_when_it_arrives(
    split: SplitWorld,
) -> None:
    stores, pdp = split.stores, split.pdp
    plain = type(split.services)(stores, split.mandates)
    up = {u.service: u for u in upstreams(stores)}
    trade = await plain.create_order(caller("alice", pdp), ORDER, "k")
    await plain.execute(caller("b", pdp), trade.trade_id, "k")
    created, executed = await stores.execution.events_after(0)
    # allocation learns the order, proposes; settlement hears the proposal first
    assert await learn_verified(stores.allocation, created.jws, up[machine.EXECUTION]) == APPLIED
    assert await learn_verified(stores.allocation, executed.jws, up[machine.EXECUTION]) == APPLIED
    await plain.propose_allocation(caller("a", pdp), trade.trade_id, ALLOC, "k")
    (proposed,) = await stores.allocation.events_after(0)
    settlement = stores.settlement
    assert await learn_verified(settlement, proposed.jws, up[machine.ALLOCATION]) == PENDING
    assert await learn_verified(settlement, executed.jws, up[machine.EXECUTION]) == PENDING
    assert await settlement.pending() == [proposed.event_id, executed.event_id]
    with pytest.raises(NotFound):
        await settlement.trade(trade.trade_id)
    # the order arrives last: everything kept is applied, in the machine's order
    assert await learn_verified(settlement, created.jws, up[machine.EXECUTION]) == APPLIED
    assert await settlement.pending() == []
    history = await settlement.history(trade.trade_id)
    assert [r.transition for r in history] == ["create", "execute", "propose_allocation"]
    assert (await settlement.trade(trade.trade_id)).state == machine.ALLOCATION_PROPOSED
    # redelivered: nothing happens
    for event, upstream in ((proposed, machine.ALLOCATION), (created, machine.EXECUTION)):
        assert await learn_verified(settlement, event.jws, up[upstream]) == KNOWN
    assert len(await settlement.history(trade.trade_id)) == 3


async def test_the_cursor_is_kept_in_the_downstream_store(split: SplitWorld) -> None:
    await to_approved(split)
    assert await split.dispatcher.hand_off() == 0  # everything was handed off already
    again = Dispatcher.between(split.stores.by_service(), upstreams(split.stores))
    assert await again.hand_off() == 0  # a new dispatcher resumes from the stored cursors
    consumer = f"execution@{EVENTS_ISSUER}"
    last = (await split.stores.execution.events_after(0))[-1].seq
    assert await split.stores.settlement.cursor(consumer) == last
    await split.stores.settlement.advance(consumer, 1)  # never moves back
    assert await split.stores.settlement.cursor(consumer) == last


async def test_an_exception_at_settlement_stops_the_upstream_owners_until_resolved(
    split: SplitWorld,
) -> None:
    s, pdp, stores = split.services, split.pdp, split.stores
    trade = await s.create_order(caller("alice", pdp), ORDER, "k")
    await s.execute(caller("broker", pdp), trade.trade_id, "k")
    # the issuer revokes the mandate while the trade is at allocation (before settlement)
    signal = Signal(ISSUER, "set-1", "session-revoked", "mandate_revoked", "", mandate_id="M-1")
    (raised,) = await s.raise_on_signal(signal)
    assert raised.from_state == machine.EXECUTED
    for service, store in stores.by_service().items():  # every store that acts learned it
        # execution's step is done: an exception after it concerns it no more
        expected = machine.EXECUTED if service == machine.EXECUTION else machine.EXCEPTION
        assert (await store.trade(trade.trade_id)).state == expected, service
    with pytest.raises(OutOfOrder) as refused:
        await s.propose_allocation(caller("alice", pdp), trade.trade_id, ALLOC, "k")
    assert (refused.value.state, refused.value.expected) == (machine.EXCEPTION, machine.EXECUTED)
    # the resolution gives the trade back to its owners
    await s.resolve_exception(caller("ops", pdp), raised.exception_id, "reconsent")
    assert (await stores.allocation.trade(trade.trade_id)).state == machine.EXECUTED
    await s.propose_allocation(caller("alice", pdp), trade.trade_id, ALLOC, "k2")
    history = await stores.reporting.history(trade.trade_id)
    assert [r.transition for r in history] == [
        "create", "execute", "exception#1", "reconsent#1", "propose_allocation",
    ]  # fmt: skip


async def test_a_revocation_finds_the_trades_resting_on_learned_transitions(
    split: SplitWorld,
) -> None:
    """The settlement's store learned which token moved the trade upstream (the event's
    ``acting``), so a token revoked at its issuer raises the exception there."""
    s, pdp, stores = split.services, split.pdp, split.stores
    trade = await s.create_order(caller("alice", pdp), ORDER, "k")
    await s.execute(caller("broker", pdp), trade.trade_id, "k")
    found = await stores.settlement.resting_on(ISSUER, token_jti="tok-broker")
    assert [t.trade_id for t in found] == [trade.trade_id]
    signal = Signal(ISSUER, "set-2", "session-revoked", "token_revoked", "", token_jti="tok-broker")
    assert len(await s.raise_on_signal(signal)) == 1
    assert (await stores.allocation.trade(trade.trade_id)).state == machine.EXCEPTION


async def test_concurrent_schema_creation_on_one_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'one.db'}"
    stores = [
        TradeStore(Database(url), EventSigner.generate(EVENTS_ISSUER), service=machine.EXECUTION)
        for _ in range(4)
    ]
    await asyncio.gather(*(store.create_schema() for store in stores))
    for store in stores:
        assert await store.events_after(0) == []
        await store.db.dispose()


async def test_a_creation_that_lost_the_race_is_tried_again() -> None:
    from sqlalchemy.exc import OperationalError

    calls: list[int] = []

    async def create() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("CREATE TABLE", {}, Exception("table ref_trades already exists"))

    await create_safely(create)
    assert len(calls) == 2

    async def broken() -> None:
        raise OperationalError("CREATE TABLE", {}, Exception("disk I/O error"))

    with pytest.raises(OperationalError, match="disk I/O"):
        await create_safely(broken)


SCHEMA_SCRIPT = """
import asyncio, sys, time
from trustplane.reference.events import EventSigner
from trustplane.reference.store import TradeStore
from trustplane.storage.db import Database

async def main() -> None:
    store = TradeStore(Database(sys.argv[1]), EventSigner.generate("https://x.example"))
    await asyncio.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
    await store.create_schema()
    await store.db.dispose()

asyncio.run(main())
"""


def test_processes_starting_at_once_on_one_file_all_make_the_schema(tmp_path: Path) -> None:
    """Two service processes started together on one store file (the demo does): every one
    finishes, none fails with ``table ... already exists``."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start_at = str(time.time() + 3)  # after every interpreter has imported
    command = [sys.executable, "-c", SCHEMA_SCRIPT, url, start_at]
    racers = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(4)
    ]
    outputs = [(p.wait(60), p.stdout.read().decode() if p.stdout else "") for p in racers]
    for process in racers:
        if process.stdout:
            process.stdout.close()
    assert [code for code, _ in outputs] == [0, 0, 0, 0], outputs


async def test_the_sweep_hands_off_what_another_process_committed(split: SplitWorld) -> None:
    """``Dispatcher.run``'s sweep: what was committed without a hand-off (another process's
    service) reaches the other stores; an outbox that did not grow is not read again."""
    plain = type(split.services)(split.stores, split.mandates)
    trade = await plain.create_order(caller("alice", split.pdp), ORDER, "k")
    assert await split.dispatcher.sweep() == 3  # the order, to the three other stores
    assert await split.dispatcher.sweep() == 0
    await plain.execute(caller("b", split.pdp), trade.trade_id, "k")
    assert await split.dispatcher.sweep() == 3
    assert (await split.stores.reporting.trade(trade.trade_id)).state == machine.EXECUTED
    stopping = asyncio.Event()
    sweeping = asyncio.create_task(split.dispatcher.run(stopping, interval=0.01))
    await plain.propose_allocation(caller("a", split.pdp), trade.trade_id, ALLOC, "k")
    for _ in range(500):
        if (await split.stores.settlement.trade(trade.trade_id)).allocation == ALLOC:
            break
        await asyncio.sleep(0.01)
    stopping.set()
    await sweeping
    assert (await split.stores.settlement.trade(trade.trade_id)).state == (
        machine.ALLOCATION_PROPOSED
    )


async def test_an_escalation_racing_a_resolution_never_reopens_it(split: SplitWorld) -> None:
    """``escalate`` and ``cancel`` of one exception, racing: a cancelled trade's exception stays
    ``resolved`` (an escalation that read it open before the cancel committed must not overwrite
    it), and an escalation after the resolution is refused, naming the resolving transition."""
    s, pdp, stores = split.services, split.pdp, split.stores
    for round_ in range(8):
        trade = await s.create_order(caller("alice", pdp), ORDER, f"k{round_}")
        await s.execute(caller("broker", pdp), trade.trade_id, f"k{round_}")
        signal = Signal(
            ISSUER, f"set-race-{round_}", "session-revoked", "mandate_revoked", "", mandate_id="M-1"
        )
        (raised,) = [r for r in await s.raise_on_signal(signal) if r.trade_id == trade.trade_id]
        ops = caller("ops", pdp)
        outcomes = await asyncio.gather(
            s.resolve_exception(ops, raised.exception_id, "escalate", "ask the desk"),
            s.resolve_exception(ops, raised.exception_id, "cancel"),
            return_exceptions=True,
        )
        escalation, cancel = outcomes
        assert not isinstance(cancel, BaseException), cancel
        if isinstance(escalation, BaseException):
            assert isinstance(escalation, DuplicateTransition), escalation
            assert escalation.record.transition == "cancel"
        final = await stores.settlement.exception(raised.exception_id)
        assert final.status == "resolved", (
            f"round {round_}: a cancelled exception is {final.status}"
        )
