"""The reference services (``trustplane.reference``) against the real Cedar engine with the default
bundle, in process: the requests the services really build are what ``policies/trade.cedar`` was
written for. The whole path is allowed by ``trade.lifecycle``; a duplicate stays the store's 409
(the services check the source state before asking); step 5 is denied by ``trade.mandate_live``;
another transaction by ``trade.transaction``; re-consent needs the operator's scope."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.policy.conftest import NWAM, client
from tests.reference.conftest import MANDATE, ORDER, Mandates
from trustplane.authzen.model import Decision, Entity
from trustplane.policy.bundle import CompiledBundle
from trustplane.policy.engine import PolicyEngine
from trustplane.reference import machine
from trustplane.reference.events import EventSigner
from trustplane.reference.services import Caller, EntitlementLost, Refused, TradeServices
from trustplane.reference.store import DuplicateTransition, TradeStore
from trustplane.storage.db import Database

DESK = ("order:create", "trade:execute", "allocation:propose", "allocation:approve")
ALLOC = [{"account": "SUB-1", "quantity": "1000"}]


class Pdp:
    """The default bundle in process; every decision kept."""

    def __init__(self, bundle: CompiledBundle) -> None:
        self.engine = PolicyEngine(issuer="test", served_regions=("eu",), observe=False)
        self.engine.activate(bundle)
        self.asked: list[tuple[str, Decision]] = []

    def caller(self, who: str, scopes: tuple[str, ...] = DESK, txn: str = "txn-1") -> Caller:
        subject = client("desk-app", NWAM, scopes)
        claims = {"sub": who, "client_id": "desk-app", "txn": txn, "mandate": MANDATE}

        async def decide(action: str, resource: Entity, context: Mapping[str, Any]) -> Decision:
            decision = await self.engine.decide(
                subject, action, resource, context, transaction_id=txn
            )
            self.asked.append((action, decision))
            return decision

        return Caller(who, claims, "raw-token", decide)


@pytest.fixture
async def setup(tmp_path: Path, default_compiled: CompiledBundle) -> Any:
    store = TradeStore(
        Database(f"sqlite+aiosqlite:///{tmp_path / 'ref.db'}"),
        EventSigner.generate("https://clearing.example"),
    )
    await store.create_schema()
    mandates = Mandates()
    yield TradeServices(store, mandates), Pdp(default_compiled), mandates
    await store.db.dispose()


async def to_approved(s: TradeServices, pdp: Pdp) -> str:
    trade = await s.create_order(pdp.caller("alice"), ORDER, "k1")
    await s.execute(pdp.caller("broker"), trade.trade_id, "k2")
    await s.propose_allocation(pdp.caller("alice"), trade.trade_id, ALLOC, "k3")
    await s.approve_allocation(pdp.caller("bob"), trade.trade_id, "k4")
    return trade.trade_id


async def test_the_whole_path_is_allowed_and_a_duplicate_stays_a_409(setup: Any) -> None:
    s, pdp, _ = setup
    trade_id = await to_approved(s, pdp)
    await s.submit_settlement(pdp.caller("clearing"), trade_id, {"ssi": "X"}, "k5")
    await s.amend_settlement(pdp.caller("clearing"), trade_id, {"ssi": "Y"}, "k6")
    await s.confirm_settlement(pdp.caller("clearing"), trade_id, "settled", "k7")
    assert (await s.store.trade(trade_id)).state == machine.SETTLED
    assert [(a, d.allowed, d.reason_ids) for a, d in pdp.asked] == [
        (action, True, ("trade.lifecycle",))
        for action in (
            "trade:create",
            "trade:execute",
            "trade:propose_allocation",
            "trade:approve_allocation",
            "trade:submit_settlement",
            "trade:submit_settlement",
            "trade:confirm_settlement",
        )
    ]
    asked = len(pdp.asked)
    with pytest.raises(DuplicateTransition):  # 409 naming the first, not a policy deny
        await s.execute(pdp.caller("broker"), trade_id, "another-key")
    assert len(pdp.asked) == asked


async def test_the_proposer_cannot_approve_even_if_the_service_did_not_stop_it(
    setup: Any,
) -> None:
    s, pdp, _ = setup
    trade = await s.create_order(pdp.caller("alice"), ORDER, "k1")
    await s.execute(pdp.caller("broker"), trade.trade_id, "k2")
    await s.propose_allocation(pdp.caller("alice"), trade.trade_id, ALLOC, "k3")
    current = await s.store.trade(trade.trade_id)
    # what a PEP without the service's own four-eyes check would ask
    decision = await pdp.caller("alice").decide(
        "trade:approve_allocation",
        Entity("Trade", current.trade_id, {"state": current.state, "account": "ACC-1",
               "instrument": "XS0000000001", "side": "buy", "currency": "EUR"}),
        {"trade_state": current.state, "transition": "approve_allocation", "actor": "alice",
         "proposer": "alice"},
    )  # fmt: skip
    assert (decision.allowed, decision.reason_ids) == (False, ("trade.four_eyes",))


async def test_another_transaction_does_not_settle(setup: Any) -> None:
    s, pdp, _ = setup
    trade_id = await to_approved(s, pdp)
    with pytest.raises(Refused) as refused:
        await s.submit_settlement(pdp.caller("clearing", txn="txn-2"), trade_id, {"s": 1}, "k5")
    assert (refused.value.status, refused.value.code) == (403, "denied")
    assert pdp.asked[-1][1].reason_ids == ("trade.transaction",)
    assert (await s.store.trade(trade_id)).state == machine.ALLOCATION_APPROVED


async def test_a_lost_mandate_is_denied_and_only_an_operator_reconsents(setup: Any) -> None:
    s, pdp, mandates = setup
    trade_id = await to_approved(s, pdp)
    mandates.revoked.add(MANDATE["id"])
    with pytest.raises(EntitlementLost) as lost:
        await s.submit_settlement(pdp.caller("clearing"), trade_id, {"ssi": "X"}, "k5")
    assert pdp.asked[-1][1].reason_ids == ("trade.mandate_live",)
    exception_id = lost.value.exception.exception_id
    with pytest.raises(Refused) as not_operator:
        await s.resolve_exception(pdp.caller("alice"), exception_id, "reconsent")
    assert (not_operator.value.status, not_operator.value.code) == (403, "denied")
    assert pdp.asked[-1][1].reason_ids == ("exception.operator_only",)
    operator = pdp.caller("ops", ("exception:view", "exception:resolve"))
    await s.resolve_exception(operator, exception_id, "escalate")
    record = await s.resolve_exception(operator, exception_id, "reconsent")
    assert record.status == "resolved"
    assert (await s.store.trade(trade_id)).state == machine.ALLOCATION_APPROVED
    # resolved: a second resolution is the service's 409, before any policy question
    asked = len(pdp.asked)
    with pytest.raises(Refused) as again:
        await s.resolve_exception(operator, exception_id, "cancel")
    assert (again.value.status, again.value.code) == (409, "already-resolved")
    assert len(pdp.asked) == asked
    # re-consented (a new mandate version in practice): the settlement goes through
    mandates.revoked.clear()
    await s.submit_settlement(pdp.caller("clearing"), trade_id, {"ssi": "X"}, "k6")
    assert (await s.store.trade(trade_id)).state == machine.SETTLEMENT_SUBMITTED
