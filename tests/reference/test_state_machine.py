"""Hypothesis stateful test of the trade state machine through the service API: any sequence of
calls (retries with the same key, new keys, reordering, duplicates, revocations, exceptions and
their resolution) leaves every trade with at most one settlement outcome, transitions only in the
machine's order, and exactly one outbox event per recorded transition."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import jwt
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from tests.reference.conftest import ISSUER, ORDER, Mandates, RecordingPdp, caller, fresh_store
from trustplane.reference import machine
from trustplane.reference.services import Refused, Signal, TradeServices
from trustplane.reference.store import DuplicateTransition, NotFound, OutOfOrder

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
        url = f"sqlite+aiosqlite:///{self.tmp / 'sm.db'}"
        self.store = self.run(fresh_store(url))
        self.pdp, self.mandates = RecordingPdp(), Mandates()
        self.services = TradeServices(self.store, self.mandates)
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
        assert set(self.refusals) <= {"four-eyes", "settlement-exception", "already-resolved"}

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

    @rule(trade=trades, action=st.sampled_from(["reconsent", "cancel", "escalate"]))
    def resolve(self, trade: str, action: str) -> None:
        record = self.run(self.store.trade(trade))
        if record.exceptions == 0:
            return
        exception_id = f"{trade}.{record.exceptions}"
        self.attempt(self.services.resolve_exception(caller("ops", self.pdp), exception_id, action))

    @invariant()
    def every_trade_moved_only_along_the_machine(self) -> None:
        events = self.run(self.store.events_after(0, limit=100_000))
        per_trade: dict[str, list[str]] = {}
        for event in events:
            per_trade.setdefault(event.trade_id, []).append(event.type)
        for trade_id, types in per_trade.items():
            history = self.run(self.store.history(trade_id))
            ends = ("settle", "fail", "cancel_settlement")
            outcomes = [r for r in history if r.transition in ends]
            assert len(outcomes) <= 1, history
            assert sum(r.transition == "submit_settlement" for r in history) <= 1
            state = None
            for record in history:
                assert record.source == state, (record, history)  # no out-of-order move
                amended = record.transition.startswith("amend#") and record.target == state
                if (
                    record.source in NEXT
                    and not amended
                    and record.target
                    not in (machine.EXCEPTION, machine.FAILED, machine.SETTLED, machine.CANCELLED)
                ):
                    assert record.target == NEXT[record.source], record
                state = record.target
            assert self.run(self.store.trade(trade_id)).state == state
            escalations = types.count("exception.escalated")
            assert len(types) == len(history) + escalations  # one event per transition
        # a SET raises at most one exception per trade, however often it was delivered
        raised = []
        for event in events:
            if event.type == "settlement.exception":
                data = jwt.decode(event.jws, options={"verify_signature": False})["data"]
                if "signal" in data:
                    raised.append((event.trade_id, data["signal"]["jti"]))
        assert len(raised) == len(set(raised)), raised

    def teardown(self) -> None:
        self.run(self.store.db.dispose())
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tp-ref-sm-")


TradeMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_trade_state_machine = TradeMachine.TestCase
