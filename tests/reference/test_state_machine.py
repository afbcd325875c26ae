"""Hypothesis stateful test of the trade state machine through the four services, each on its own
store, with the hand-off between the stores as a rule of its own: any sequence of calls (retries
with the same key, new keys, reordering, duplicates, revocations, exceptions and their resolution)
interleaved with deliveries of the owners' events (delayed, repeated, out of order, or the
dispatcher's in-order sweep) leaves every trade with at most one settlement outcome in every store,
every store's history in the machine's order, exactly one outbox event per owned transition, and
every learned transition matching its owner's event."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import jwt
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from tests.reference.conftest import (
    ISSUER,
    ORDER,
    Mandates,
    RecordingPdp,
    caller,
    split_stores,
    upstreams,
)
from trustplane.reference import machine
from trustplane.reference.handoff import Dispatcher, learn_verified
from trustplane.reference.services import Refused, Signal, TradeServices
from trustplane.reference.store import DuplicateTransition, NotFound, OutOfOrder, TradeStore

SUBJECTS = st.sampled_from(["alice", "bob", "carol"])
KEYS = st.sampled_from(["k1", "k2", "k3"])
ALLOC = [{"account": "SUB-1", "quantity": "1000"}]
#: the legal successor of each state along the machine (exceptions aside)
NEXT = {t.source: t.target for t in machine.PATH} | {machine.SETTLEMENT_SUBMITTED: "outcome"}


class TradeMachine(RuleBasedStateMachine):
    trades = Bundle("trades")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(self.loop.run_until_complete(asyncio.to_thread(_tmpdir)))
        urls = {s: f"sqlite+aiosqlite:///{self.tmp / f'{s}.db'}" for s in machine.SERVICES}
        self.stores = self.run(split_stores(urls))
        self.store = self.stores.settlement
        self.upstreams = upstreams(self.stores)
        self.dispatcher = Dispatcher.between(self.stores.by_service(), self.upstreams)
        self.pdp, self.mandates = RecordingPdp(), Mandates()
        # no hand-off inside the calls: the deliveries are rules, in any order
        self.services = TradeServices(self.stores, self.mandates)
        # ... except for ``advance``, the services as served (hand-off before each call returns)
        self.handing = TradeServices(self.stores, self.mandates, handoff=self.dispatcher)
        self.refusals: list[str] = []

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def attempt(self, coro: Any) -> None:
        try:
            self.run(coro)
        except (DuplicateTransition, OutOfOrder, NotFound):
            pass
        except Refused as exc:
            self.refusals.append(exc.code)
        allowed = {"four-eyes", "settlement-exception", "already-resolved", "not-found"}
        assert set(self.refusals) <= allowed

    @rule(target=trades, subject=SUBJECTS)
    def create(self, subject: str) -> str:
        trade = self.run(self.services.create_order(caller(subject, self.pdp), ORDER, "k"))
        return str(trade.trade_id)

    @rule(trade=trades, subject=SUBJECTS, key=KEYS)
    def execute(self, trade: str, subject: str, key: str) -> None:
        self.attempt(self.services.execute(caller(subject, self.pdp), trade, key))

    @rule(trade=trades, subject=SUBJECTS, key=KEYS)
    def propose(self, trade: str, subject: str, key: str) -> None:
        c = caller(subject, self.pdp)
        self.attempt(self.services.propose_allocation(c, trade, ALLOC, key))

    @rule(trade=trades, subject=SUBJECTS, key=KEYS)
    def approve(self, trade: str, subject: str, key: str) -> None:
        self.attempt(self.services.approve_allocation(caller(subject, self.pdp), trade, key))

    @rule(trade=trades, subject=SUBJECTS, key=KEYS)
    def submit(self, trade: str, subject: str, key: str) -> None:
        c = caller(subject, self.pdp)
        self.attempt(self.services.submit_settlement(c, trade, {"ssi": "X"}, key))

    @rule(trade=trades, key=KEYS)
    def amend(self, trade: str, key: str) -> None:
        c = caller("clearing", self.pdp)
        self.attempt(self.services.amend_settlement(c, trade, {"ssi": key}, key))

    @rule(trade=trades, key=KEYS)
    def cancel(self, trade: str, key: str) -> None:
        self.attempt(self.services.cancel_settlement(caller("clearing", self.pdp), trade, key))

    @rule(trade=trades, outcome=st.sampled_from(["settled", "failed"]), key=KEYS)
    def confirm(self, trade: str, outcome: str, key: str) -> None:
        c = caller("clearing", self.pdp)
        self.attempt(self.services.confirm_settlement(c, trade, outcome, key))

    @rule(revoked=st.booleans())
    def mandate(self, revoked: bool) -> None:
        if revoked:
            self.mandates.revoked.add("M-1")
        else:
            self.mandates.revoked.discard("M-1")

    @rule(
        number=st.integers(1, 3),
        token=st.sampled_from([None, "tok-alice", "tok-bob", "tok-clearing"]),
    )
    def signal(self, number: int, token: str | None) -> None:
        """The issuer revokes the mandate (``token`` None) or a token; SETs are redelivered (the
        same ``number`` again)."""
        kind = "mandate_revoked" if token is None else "token_revoked"
        jti = f"set-{token}-{number}"
        if token is None:
            signal = Signal(ISSUER, jti, "session-revoked", kind, "", mandate_id="M-1")
        else:
            signal = Signal(ISSUER, jti, "session-revoked", kind, "", token_jti=token)
        for record in self.run(self.services.raise_on_signal(signal)):
            assert record.reason == kind

    @rule(
        upstream=st.integers(0, 2),
        downstream=st.sampled_from(machine.SERVICES),
        pick=st.integers(0, 1000),
    )
    def deliver(self, upstream: int, downstream: str, pick: int) -> None:
        """One event of an owner's outbox, any of them (delayed, repeated, ahead of its
        predecessor), to any other store (one it does not concern skips it: ``concerns``)."""
        source = self.upstreams[upstream]
        if downstream == source.service:
            return
        events = self.run(source.store.events_after(0, limit=100_000))
        if not events:
            return
        event = events[pick % len(events)]
        store = self.stores.by_service()[downstream]
        self.run(learn_verified(store, event.jws, source))

    @rule(trade=trades, outcome=st.sampled_from(["settled", "failed"]))
    def advance(self, trade: str, outcome: str) -> None:
        """Every step of the path in turn, through the services with the embedded hand-off: the
        trade goes as far as its stores let it (steps out of place are refused)."""
        s, pdp = self.handing, self.pdp
        self.attempt(s.execute(caller("broker", pdp), trade, "adv"))
        self.attempt(s.propose_allocation(caller("alice", pdp), trade, ALLOC, "adv"))
        self.attempt(s.approve_allocation(caller("bob", pdp), trade, "adv"))
        self.attempt(s.submit_settlement(caller("clearing", pdp), trade, {"ssi": "A"}, "adv"))
        self.attempt(s.confirm_settlement(caller("clearing", pdp), trade, outcome, "adv"))

    @rule()
    def sweep(self) -> None:
        """The embedded dispatcher: everything since each cursor, in commit order."""
        self.run(self.dispatcher.hand_off())

    @rule(trade=trades, action=st.sampled_from(["reconsent", "cancel", "escalate"]))
    def resolve(self, trade: str, action: str) -> None:
        try:
            record = self.run(self.store.trade(trade))
        except NotFound:
            return
        if record.exceptions == 0:
            return
        exception_id = f"{trade}.{record.exceptions}"
        self.attempt(self.services.resolve_exception(caller("ops", self.pdp), exception_id, action))

    @invariant()
    def every_store_moved_only_along_the_machine(self) -> None:
        ends = ("settle", "fail", "cancel_settlement")
        snapshots = {s: self.run(_snapshot(store)) for s, store in self.stores.by_service().items()}
        owned_events: dict[str, tuple[str, str]] = {}  # event id -> (trade, transition)
        for snapshot in snapshots.values():
            for event in snapshot.events:
                owned_events[event["jti"]] = (event["trade_id"], event["transition"])
        outcomes: dict[str, set[str]] = {}
        for service, snapshot in snapshots.items():
            for trade_id in set(snapshot.states) | set(snapshot.histories):
                history = snapshot.histories.get(trade_id, [])
                assert sum(r.transition in ends for r in history) <= 1, history
                assert sum(r.transition == "submit_settlement" for r in history) <= 1
                outcomes.setdefault(trade_id, set()).update(
                    r.transition for r in history if r.transition in ends
                )
                state = None
                for record in history:
                    assert record.source == state, (service, record, history)  # in order
                    amended = record.transition.startswith("amend#") and record.target == state
                    if (
                        record.source in NEXT
                        and not amended
                        and record.target not in (machine.EXCEPTION, *machine.TERMINAL)
                    ):
                        assert record.target == NEXT[record.source], record
                    state = record.target
                    if record.actor.startswith("event:"):  # learned: its owner's event
                        assert owned_events[record.event_id] == (trade_id, record.transition)
                assert snapshot.states.get(trade_id) == state
                owned = [r for r in history if machine.owner(r.transition) == service]
                types = [e["type"] for e in snapshot.events if e["trade_id"] == trade_id]
                escalations = types.count("exception.escalated")
                assert len(types) == len(owned) + escalations  # one event per owned transition
        # no trade has two settlement outcomes, whichever store is asked
        assert all(len(found) <= 1 for found in outcomes.values()), outcomes
        # a SET raises at most one exception per trade, however often it was delivered
        raised = [
            (e["trade_id"], e["data"]["signal"]["jti"])
            for e in snapshots[machine.SETTLEMENT].events
            if e["type"] == "settlement.exception" and "signal" in e["data"]
        ]
        assert len(raised) == len(set(raised)), raised

    def teardown(self) -> None:
        for store in self.stores.distinct():
            self.run(store.db.dispose())
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Snapshot:
    """One store at one instant: each trade's state and history, its outbox's event payloads."""

    states: dict[str, str]
    histories: dict[str, list[Any]]
    events: list[dict[str, Any]]


async def _snapshot(store: TradeStore) -> Snapshot:
    from sqlalchemy import select

    from trustplane.reference.store import _transition, outbox, trades, transitions

    async with store.db.read() as conn:
        states = {r.trade_id: r.state for r in await conn.execute(select(trades))}
        rows = await conn.execute(select(transitions).order_by(transitions.c.id))
        histories: dict[str, list[Any]] = {}
        for row in rows:
            histories.setdefault(row.trade_id, []).append(_transition(row))
        jws = [r.jws for r in await conn.execute(select(outbox.c.jws).order_by(outbox.c.seq))]
    events = [jwt.decode(j, options={"verify_signature": False}) for j in jws]
    return Snapshot(states, histories, events)


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tp-ref-sm-")


TradeMachine.TestCase.settings = settings(
    max_examples=10,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_trade_state_machine = TradeMachine.TestCase
