"""The trade state machine through the service API: the whole path, duplicates refused for ever
(naming what happened), out-of-order refused, four eyes, PDP denies, the event-time entitlement
exception and its resolution, on SQLite and PostgreSQL."""

from __future__ import annotations

import jwt
import pytest

from tests.reference.conftest import MANDATE, ORDER, World, caller
from trustplane.reference import machine
from trustplane.reference.events import EventRefused, verify_event
from trustplane.reference.services import EntitlementLost, Refused
from trustplane.reference.store import DuplicateTransition, OutOfOrder

ALLOC = [{"account": "SUB-1", "quantity": "600"}, {"account": "SUB-2", "quantity": "400"}]


async def to_approved(world: World) -> str:
    s, pdp = world.services, world.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k-order")
    await s.execute(caller("broker", pdp), trade.trade_id, "k-exec")
    await s.propose_allocation(caller("alice", pdp), trade.trade_id, ALLOC, "k-prop")
    await s.approve_allocation(caller("bob", pdp), trade.trade_id, "k-appr")
    return trade.trade_id


async def test_the_whole_path_writes_one_signed_event_per_transition(world: World) -> None:
    trade_id = await to_approved(world)
    s, pdp = world.services, world.pdp
    await s.submit_settlement(caller("clearing", pdp), trade_id, {"ssi": "X"}, "k-sub")
    await s.confirm_settlement(caller("clearing", pdp), trade_id, "settled", "k-conf")

    report = await s.report(trade_id)
    assert report["state"] == machine.SETTLED
    names = [t["transition"] for t in report["transitions"]]
    assert names == ["create"] + [t.name for t in machine.PATH]
    events = await world.store.events_after(0)
    assert [e.type for e in events] == [
        "order.created",
        "trade.executed",
        "allocation.proposed",
        "allocation.approved",
        "settlement.submitted",
        "settlement.settled",
    ]
    jwks = world.store.signer.jwks()
    key = jwt.PyJWK(jwks["keys"][0])
    for event in events:
        # an independent JOSE library verifies each event against the published JWKS
        claims = jwt.decode(event.jws, key.key, algorithms=["ES256"])
        assert jwt.get_unverified_header(event.jws)["typ"] == "trade-event+jwt"
        assert claims["jti"] == event.event_id
        assert claims["trade_id"] == trade_id
        envelope = claims["envelope"]
        assert envelope["txn"] == "txn-1"
        assert envelope["mandate"] == MANDATE
        assert envelope["act"] == [{"sub": "arranger-svc"}, {"sub": "origin"}]
        assert envelope["authorization_details_digest"]
        assert len(envelope["decision_ids"]) == 1
        assert envelope["policy_bundle_version"] == "bundle-7"
        assert verify_event(event.jws, jwks, issuer="https://settle.example") == claims
    # every transition asked the PDP with the trade's state in the context
    states = [ctx["trade_state"] for _action, _d, ctx in world.pdp.decisions]
    assert states == ["none", "created", "executed", "allocation_proposed", "allocation_approved",
                      "settlement_submitted"]  # fmt: skip


async def test_a_tampered_event_is_refused(world: World) -> None:
    trade_id = await to_approved(world)
    event = (await world.store.events_after(0))[-1]
    head, payload, sig = event.jws.split(".")
    forged = jwt.api_jws.base64url_encode(
        jwt.api_jws.base64url_decode(payload).replace(trade_id.encode(), b"another-trade")
    ).decode()
    jwks = world.store.signer.jwks()
    with pytest.raises(EventRefused, match="signature"):
        verify_event(f"{head}.{forged}.{sig}", jwks, issuer="https://settle.example")
    with pytest.raises(EventRefused, match="issuer"):
        verify_event(event.jws, jwks, issuer="https://other.example")
    other = world.store.signer.generate("https://settle.example").jwks()
    with pytest.raises(EventRefused):
        verify_event(event.jws, other, issuer="https://settle.example")
    with pytest.raises(EventRefused, match="compact"):
        verify_event("not-a-jws", jwks, issuer="https://settle.example")


async def test_a_duplicate_transition_is_refused_for_ever_naming_the_first(world: World) -> None:
    trade_id = await to_approved(world)
    with pytest.raises(DuplicateTransition) as refused:
        await world.services.execute(caller("broker-2", world.pdp), trade_id, "another-key")
    record = refused.value.record
    assert (record.transition, record.actor, record.idempotency_key) == (
        "execute",
        "broker",
        "k-exec",
    )
    assert record.at > 0
    # no new event, no state change
    assert len(await world.store.events_after(0)) == 4
    assert (await world.store.trade(trade_id)).state == machine.ALLOCATION_APPROVED


async def test_out_of_order_is_refused(world: World) -> None:
    s, pdp = world.services, world.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k1")
    with pytest.raises(OutOfOrder) as refused:
        await s.approve_allocation(caller("bob", pdp), trade.trade_id, "k2")
    assert (refused.value.state, refused.value.expected) == ("created", "allocation_proposed")
    with pytest.raises(OutOfOrder):
        await s.submit_settlement(caller("c", pdp), trade.trade_id, {}, "k3")
    assert world.mandates.asked == 0  # refused before any introspection
    with pytest.raises(Refused) as missing:
        await s.execute(caller("b", pdp), "no-such-trade", "k4")
    assert (missing.value.status, missing.value.code) == (404, "not-found")


async def test_four_eyes_the_proposer_cannot_approve(world: World) -> None:
    s, pdp = world.services, world.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k1")
    await s.execute(caller("broker", pdp), trade.trade_id, "k2")
    await s.propose_allocation(caller("alice", pdp), trade.trade_id, ALLOC, "k3")
    with pytest.raises(Refused) as refused:
        await s.approve_allocation(caller("alice", pdp), trade.trade_id, "k4")
    assert (refused.value.status, refused.value.code) == (403, "four-eyes")
    assert (await world.store.trade(trade.trade_id)).state == machine.ALLOCATION_PROPOSED


async def test_a_policy_deny_moves_nothing(world: World) -> None:
    s, pdp = world.services, world.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k1")
    pdp.deny.add("trade:execute")
    with pytest.raises(Refused) as refused:
        await s.execute(caller("broker", pdp), trade.trade_id, "k2")
    assert (refused.value.status, refused.value.code) == (403, "denied")
    assert refused.value.extra["decision_id"] == pdp.decisions[-1][1].decision_id
    assert (await world.store.trade(trade.trade_id)).state == machine.CREATED
    assert len(await world.store.events_after(0)) == 1


@pytest.mark.parametrize(
    ("order", "detail"),
    [
        ({**ORDER, "side": "hold"}, "side"),
        ({**ORDER, "quantity": "-1"}, "quantity"),
        ({**ORDER, "amount": "NaN"}, "amount"),
        ({**ORDER, "currency": "eur"}, "currency"),
        ({**ORDER, "account": ""}, "account"),
    ],
)
async def test_bad_orders_are_400_and_write_nothing(
    world: World, order: dict[str, str], detail: str
) -> None:
    with pytest.raises(Refused) as refused:
        await world.services.create_order(caller("alice", world.pdp), order, "k")
    assert (refused.value.status, refused.value.code) == (400, "invalid-request")
    assert detail in refused.value.detail
    assert await world.store.events_after(0) == []


async def test_allocations_must_add_up(world: World) -> None:
    s, pdp = world.services, world.pdp
    trade = await s.create_order(caller("alice", pdp), ORDER, "k1")
    await s.execute(caller("broker", pdp), trade.trade_id, "k2")
    with pytest.raises(Refused, match="add up"):
        await s.propose_allocation(caller("a", pdp), trade.trade_id, ALLOC[:1], "k3")


async def test_mandate_revoked_before_settlement_raises_an_exception(world: World) -> None:
    trade_id = await to_approved(world)
    world.mandates.revoked.add("M-1")
    s, pdp = world.services, world.pdp
    with pytest.raises(EntitlementLost) as refused:
        await s.submit_settlement(caller("clearing", pdp), trade_id, {"ssi": "X"}, "k-sub")
    assert (refused.value.status, refused.value.code) == (403, "settlement-exception")
    exception = refused.value.exception
    assert (exception.exception_id, exception.reason, exception.status) == (
        f"{trade_id}.1",
        "mandate_not_usable",
        "open",
    )
    # the PDP was asked with the event as context, and denied (recorded by the PDP)
    action, decision, context = pdp.decisions[-1]
    assert action == "trade:submit_settlement"
    assert not decision.allowed
    assert context["mandate_active"] is False
    assert context["event_type"] == "allocation.approved"
    assert (await world.store.trade(trade_id)).state == machine.EXCEPTION
    last = (await world.store.events_after(0))[-1]
    assert last.type == "settlement.exception"
    claims = jwt.decode(last.jws, options={"verify_signature": False})
    assert claims["data"]["exception"]["reason"] == "mandate_not_usable"
    assert claims["envelope"]["decision_ids"] == [decision.decision_id]
    # never a silent success: confirming is out of order
    with pytest.raises(OutOfOrder):
        await s.confirm_settlement(caller("clearing", pdp), trade_id, "settled", "k-c")

    # operators: list, escalate, re-consent; then the submission re-checks and goes through
    assert [e.exception_id for e in await s.list_exceptions("open")] == [f"{trade_id}.1"]
    ops = caller("operator", pdp)
    escalated = await s.resolve_exception(ops, f"{trade_id}.1", "escalate", "ask the desk")
    assert escalated.status == "escalated"
    world.mandates.revoked.clear()
    resolved = await s.resolve_exception(ops, f"{trade_id}.1", "reconsent", "M-1 v2 granted")
    assert (resolved.status, resolved.resolution) == ("resolved", "reconsent")
    assert (await world.store.trade(trade_id)).state == machine.ALLOCATION_APPROVED
    with pytest.raises(Refused) as again:
        await s.resolve_exception(ops, f"{trade_id}.1", "cancel")
    assert (again.value.status, again.value.code) == (409, "already-resolved")
    await s.submit_settlement(caller("clearing", pdp), trade_id, {"ssi": "X"}, "k-sub2")
    types = [e.type for e in await world.store.events_after(0)][-4:]
    assert types == [
        "settlement.exception",
        "exception.escalated",
        "exception.resolved",
        "settlement.submitted",
    ]


async def test_an_exception_can_be_cancelled(world: World) -> None:
    trade_id = await to_approved(world)
    world.mandates.revoked.add("M-1")
    s, pdp = world.services, world.pdp
    with pytest.raises(EntitlementLost):
        await s.submit_settlement(caller("clearing", pdp), trade_id, {}, "k")
    await s.resolve_exception(caller("operator", pdp), f"{trade_id}.1", "cancel")
    assert (await world.store.trade(trade_id)).state == machine.CANCELLED
    with pytest.raises(OutOfOrder):
        await s.submit_settlement(caller("clearing", pdp), trade_id, {}, "k2")
    with pytest.raises(Refused) as bad:
        await s.resolve_exception(caller("operator", pdp), f"{trade_id}.1", "ignore")
    assert bad.value.status == 400
    with pytest.raises(Refused) as missing:
        await s.resolve_exception(caller("operator", pdp), "nope.1", "cancel")
    assert missing.value.status == 404


async def test_settled_and_failed_exclude_each_other(world: World) -> None:
    trade_id = await to_approved(world)
    s, pdp = world.services, world.pdp
    await s.submit_settlement(caller("clearing", pdp), trade_id, {}, "k")
    await s.confirm_settlement(caller("clearing", pdp), trade_id, "failed", "k1")
    with pytest.raises(OutOfOrder):
        await s.confirm_settlement(caller("clearing", pdp), trade_id, "settled", "k2")
    with pytest.raises(DuplicateTransition):
        await s.confirm_settlement(caller("clearing", pdp), trade_id, "failed", "k3")


async def test_amend_rechecks_the_mandate_and_cancel_ends_the_trade(world: World) -> None:
    trade_id = await to_approved(world)
    s, pdp = world.services, world.pdp
    await s.submit_settlement(caller("clearing", pdp), trade_id, {"ssi": "A"}, "k")
    first = await s.amend_settlement(caller("clearing", pdp), trade_id, {"ssi": "B"}, "k1")
    second = await s.amend_settlement(caller("clearing", pdp), trade_id, {"ssi": "C"}, "k2")
    assert (first.transition, second.transition) == ("amend#1", "amend#2")
    assert (await world.store.trade(trade_id)).settlement == {"ssi": "C"}
    assert (await world.store.events_after(0))[-1].type == "settlement.amended"
    with pytest.raises(Refused) as bad:
        await s.amend_settlement(caller("clearing", pdp), trade_id, ["x"], "k3")
    assert (bad.value.status, bad.value.code) == (400, "invalid-request")

    world.mandates.revoked.add("M-1")
    with pytest.raises(EntitlementLost) as lost:
        await s.amend_settlement(caller("clearing", pdp), trade_id, {"ssi": "D"}, "k4")
    assert lost.value.exception.from_state == machine.SETTLEMENT_SUBMITTED
    assert (await world.store.trade(trade_id)).settlement == {"ssi": "C"}
    world.mandates.revoked.clear()
    await s.resolve_exception(caller("ops", pdp), f"{trade_id}.1", "reconsent")
    await s.cancel_settlement(caller("clearing", pdp), trade_id, "k5")
    assert (await world.store.trade(trade_id)).state == machine.CANCELLED
    assert (await world.store.events_after(0))[-1].type == "settlement.cancelled"
    with pytest.raises(DuplicateTransition):
        await s.cancel_settlement(caller("clearing", pdp), trade_id, "k6")
    with pytest.raises(OutOfOrder):
        await s.confirm_settlement(caller("clearing", pdp), trade_id, "settled", "k7")
