"""The decision point: forbid wins, reason ids, fail closed, every decision recorded."""

from __future__ import annotations

import uuid
from types import MappingProxyType

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from sqlalchemy import select

from tests.policy.conftest import ARR, client, order, order_request, trade
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.authzen.model import DecisionRequest, Entity
from trustplane.policy import engine as engine_module
from trustplane.policy.bundle import BundleSource, CompiledBundle, compile_bundle
from trustplane.policy.engine import PolicyEngine, cedar_input
from trustplane.policy.tables import policy_decisions


def _engine(bundle: CompiledBundle | None, regions: tuple[str, ...] = ("eu",)) -> PolicyEngine:
    engine = PolicyEngine(issuer="https://as.example", served_regions=regions)
    if bundle is not None:
        engine.activate(bundle)
    return engine


def _fail_count(reason: str) -> float:
    value = REGISTRY.get_sample_value("trustplane_policy_fail_closed_total", {"reason": reason})
    return value or 0.0


async def test_decide_allows_with_the_determining_policy(default_compiled: CompiledBundle) -> None:
    engine = _engine(default_compiled)
    decision = await engine.decide(client(), "order:create", order(), trade())
    assert decision.allowed
    assert decision.reason_ids == ("entity.own",)
    assert decision.bundle_version == default_compiled.version
    assert len(decision.decision_id) == 32


async def test_decide_many_keeps_order_and_separates_entity_sets(
    default_compiled: CompiledBundle,
) -> None:
    """Requests whose entities disagree (same uid, other attributes) are evaluated apart."""
    engine = _engine(default_compiled)
    requests = [
        order_request(),
        order_request(resource=order(restricted=True)),
        order_request(subject=client("arr-oms", ARR)),
        DecisionRequest(
            client(), "order:create", order("ord-9"), trade(amount_minor=2_000_000_000)
        ),
    ]
    decisions = await engine.decide_many(requests)
    assert [(d.allowed, d.reason_ids) for d in decisions] == [
        (True, ("entity.own",)),
        (False, ("instrument.restricted",)),
        (False, ("default_deny",)),
        (False, ("order.large_ticket_approval",)),
    ]
    assert len({d.decision_id for d in decisions}) == 4
    # time-ordered ids (UUIDv7): policy_decisions, keyed by them, grows at its right edge
    assert {uuid.UUID(hex=d.decision_id).version for d in decisions} == {7}


async def test_served_regions_come_from_the_deployment(default_compiled: CompiledBundle) -> None:
    """A caller cannot claim that this deployment serves its region."""
    us_only = _engine(default_compiled, ("us",))
    spoofed = trade(served_regions=["eu"])
    decision = await us_only.decide(client(), "order:create", order(), spoofed)
    assert (decision.allowed, decision.reason_ids) == (False, ("residency.region_served",))


class Tagged(Entity):
    """A subclass of ``Entity``: converted like one (the engine's exact-type fast path must not
    pass it through as an unknown value)."""

    __slots__ = ()


def test_cedar_input_documents_of_every_value_kind() -> None:
    lei = Entity("LegalEntity", "L1")
    desk = Tagged("Desk", "D1", {}, (lei,))
    subject = Entity("User", "u1", {"legal_entity": lei}, (desk, lei))
    resource = Entity(
        "Report",
        "r1",
        {"owner": Tagged("LegalEntity", "L2"), "tags": frozenset({"b", "a"}), "ids": (1, 2)},
    )
    context = {
        "nested": MappingProxyType({"who": desk, "n": 3}),
        "desks": [desk, Entity("Desk", "D2", {}, (lei,))],
        "levels": frozenset({30, 4}),
        "flag": True,
    }
    cedar = cedar_input(DecisionRequest(subject, "report:view", resource, context), ("eu",))
    assert cedar.request == {
        "principal": {"type": "User", "id": "u1"},
        "action": {"type": "Action", "id": "report:view"},
        "resource": {"type": "Report", "id": "r1"},
        "context": {
            "nested": {"who": {"__entity": {"type": "Desk", "id": "D1"}}, "n": 3},
            "desks": [
                {"__entity": {"type": "Desk", "id": "D1"}},
                {"__entity": {"type": "Desk", "id": "D2"}},
            ],
            "levels": [30, 4],  # a set sorts by its items' JSON text
            "flag": True,
            "served_regions": ["eu"],
        },
    }
    lei_uid = {"type": "LegalEntity", "id": "L1"}
    assert list(cedar.entities.values()) == [
        {"uid": {"type": "Desk", "id": "D1"}, "attrs": {}, "parents": [lei_uid]},
        {
            "uid": {"type": "User", "id": "u1"},
            "attrs": {"legal_entity": {"__entity": lei_uid}},
            "parents": [{"type": "Desk", "id": "D1"}, lei_uid],
        },
        {
            "uid": {"type": "Report", "id": "r1"},
            "attrs": {
                "owner": {"__entity": {"type": "LegalEntity", "id": "L2"}},
                "tags": ["a", "b"],
                "ids": [1, 2],
            },
            "parents": [],
        },
        {"uid": {"type": "Desk", "id": "D2"}, "attrs": {}, "parents": [lei_uid]},
    ]


def _varied_requests() -> list[DecisionRequest]:
    """An allow, a forbid, another legal entity, an amount over the limit, another region."""
    return [
        order_request(),
        order_request(resource=order(restricted=True)),
        order_request(subject=client("arr-oms", ARR)),
        order_request(amount_minor=2_000_000_000),
        order_request(data_region="us"),
    ]


async def test_one_request_is_decided_alone_as_in_a_batch(default_compiled: CompiledBundle) -> None:
    """A single request takes a shorter path than a batch; the answer and the recorded inputs are
    the same, with or without a recorder."""
    engine = _engine(default_compiled)
    requests = [*_varied_requests(), order_request(amount_minor=1.5)]
    in_batch = engine.evaluate(requests)
    for request, (decision, record) in zip(requests, in_batch, strict=True):
        [(alone, alone_record)] = engine.evaluate([request])
        [decided] = await engine.decide_many([request])
        expected = (decision.allowed, decision.reason_ids)
        assert (
            (alone.allowed, alone.reason_ids) == (decided.allowed, decided.reason_ids) == expected
        )
        assert alone_record.inputs == record.inputs
    assert [d.reason_ids for d, _ in in_batch][-1] == ("invalid_request",)


async def test_without_a_recorder_decide_builds_no_record(
    default_compiled: CompiledBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_record(*_args: object) -> None:
        raise AssertionError("a record was built that nothing would write")

    monkeypatch.setattr(PolicyEngine, "_record", no_record)
    decision = await _engine(default_compiled).decide(client(), "order:create", order(), trade())
    assert decision.allowed


async def test_without_a_bundle_an_unbuildable_request_is_still_invalid() -> None:
    decision = await _engine(None).decide(
        client(), "order:create", order(), trade(amount_minor=1.5)
    )
    assert decision.reason_ids == ("invalid_request",)


def test_decisions_call_the_extension_and_agree_with_the_public_call(
    default_compiled: CompiledBundle,
) -> None:
    """The engine calls cedarpy's extension directly (its answers read with orjson), since it
    answered the import-time probe as Cedar must; its outcomes are the public call's, errors
    included."""
    assert engine_module._NATIVE_BATCH is not None
    requests = [
        *_varied_requests(),
        DecisionRequest(client(), "order:create", order(), {"data_region": "eu"}),
        DecisionRequest(
            client(),
            "order:create",
            Entity("Order", "o", {**order().attributes, "instrument": Entity("Instrument", "X")}),
            trade(),
        ),
    ]
    inputs = [cedar_input(r, ("eu",)) for r in requests]
    policies, schema = default_compiled.policies, default_compiled.schema
    outcomes = []
    for item in inputs:
        request = {**item.request, "context": orjson.dumps(item.request["context"]).decode()}
        entities = orjson.dumps(list(item.entities.values())).decode()
        native = engine_module.authorize_batch([request], policies, entities, schema)
        assert native == engine_module._public_batch([request], policies, entities, schema)
        outcomes.extend(native)
    assert [(o.allowed, o.failure) for o in outcomes] == [
        (True, None),
        (False, None),
        (False, None),
        (False, None),
        (False, None),
        (False, "missing_attribute"),
        (False, "missing_attribute"),
    ]
    assert outcomes[0].reason_ids == ("entity.own",)


async def test_without_the_extension_decisions_take_the_public_call(
    default_compiled: CompiledBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "_NATIVE_BATCH", None)
    engine = _engine(default_compiled)
    decision = await engine.decide(client(), "order:create", order(), trade())
    assert (decision.allowed, decision.reason_ids) == (True, ("entity.own",))
    [many] = await engine.decide_many([order_request(resource=order(restricted=True))])
    assert not many.allowed


def test_an_extension_that_answers_otherwise_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe checks the extension's answers against Cedar's known outcomes: a wrong answer or
    an exception (another calling convention) means the public call is used."""
    from cedarpy import _internal

    real = _internal.is_authorized_batch

    def always_allow(requests: list[object], *args: object) -> list[str]:
        return ['{"decision":"Allow","diagnostics":{"reason":[],"errors":[]}}' for _ in requests]

    def other_convention(*args: object) -> list[str]:
        if len(args) != 4:
            raise TypeError("takes 4 positional arguments")
        return list(real(*args, False))

    monkeypatch.setattr(_internal, "is_authorized_batch", always_allow)
    assert engine_module._native_batch_or_none() is None
    monkeypatch.setattr(_internal, "is_authorized_batch", other_convention)
    assert engine_module._native_batch_or_none() is None
    monkeypatch.setattr(_internal, "is_authorized_batch", real)
    assert engine_module._native_batch_or_none() is real


# --------------------------------------------------------------------------- fail closed


@pytest.mark.parametrize("native", [True, False], ids=["extension", "public"])
async def test_engine_error_is_a_deny_with_reason_and_metric(
    default_compiled: CompiledBundle, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("engine crashed")

    if native:
        monkeypatch.setattr(engine_module, "_NATIVE_BATCH", broken)
    else:
        monkeypatch.setattr(engine_module, "_NATIVE_BATCH", None)
        monkeypatch.setattr(engine_module.cedarpy, "is_authorized_batch", broken)
    before = _fail_count("engine_error")
    decision = await _engine(default_compiled).decide(client(), "order:create", order(), trade())
    assert (decision.allowed, decision.reason_ids) == (False, ("engine_error",))
    assert _fail_count("engine_error") == before + 1


async def test_missing_context_attribute_is_a_deny_with_reason_and_metric(
    default_compiled: CompiledBundle,
) -> None:
    context = trade()
    del context["amount_minor"]
    before = _fail_count("missing_attribute")
    decision = await _engine(default_compiled).decide(client(), "order:create", order(), context)
    assert (decision.allowed, decision.reason_ids) == (False, ("missing_attribute",))
    assert _fail_count("missing_attribute") == before + 1


async def test_an_erroring_forbid_never_becomes_an_allow(default_compiled: CompiledBundle) -> None:
    """Cedar skips a policy whose evaluation errors; the permit alone would allow. We deny."""
    bare = Entity("Instrument", "XS999")  # referenced, attributes not supplied
    resource = Entity(
        "Order",
        "o",
        {"owner": client().parents[0], "account": Entity("Account", "A"), "instrument": bare},
    )
    decision = await _engine(default_compiled).decide(client(), "order:create", resource, trade())
    assert (decision.allowed, decision.reason_ids) == (False, ("missing_attribute",))


async def test_entity_attribute_of_the_wrong_type_is_a_deny(
    default_compiled: CompiledBundle,
) -> None:
    resource = order()
    bad = Entity("Order", resource.id, {**resource.attributes, "owner": "not-an-entity"})
    decision = await _engine(default_compiled).decide(client(), "order:create", bad, trade())
    assert (decision.allowed, decision.reason_ids) == (False, ("invalid_request",))


@pytest.mark.parametrize(
    ("subject", "context", "reason"),
    [
        (client(), {**trade(), "amount_minor": 1.5}, "invalid_request"),
        (
            Entity("Client", "nw-oms", {"legal_entity": ARR, "scopes": frozenset()}),
            {**trade(), "other": client("nw-oms")},
            "invalid_request",
        ),
    ],
)
async def test_unbuildable_requests_are_denied(
    default_compiled: CompiledBundle, subject: Entity, context: dict[str, object], reason: str
) -> None:
    decision = await _engine(default_compiled).decide(subject, "order:create", order(), context)
    assert (decision.allowed, decision.reason_ids) == (False, (reason,))


async def test_no_active_bundle_is_a_deny() -> None:
    decision = await _engine(None).decide(client(), "order:create", order(), trade())
    assert (decision.allowed, decision.reason_ids, decision.bundle_version) == (
        False,
        ("no_active_bundle",),
        "none",
    )


# --------------------------------------------------------------------------- forbid wins

SCHEMA = """
entity P; entity R;
action "act" appliesTo { principal: [P], resource: [R], context: { a: Long, b: Long } };
"""

condition = st.tuples(
    st.sampled_from(["a", "b"]), st.sampled_from(["<", ">", "=="]), st.integers(-3, 3)
)
policy = st.tuples(st.sampled_from(["permit", "forbid"]), st.lists(condition, max_size=2))


def _holds(conds: list[tuple[str, str, int]], ctx: dict[str, int]) -> bool:
    ops = {"<": int.__lt__, ">": int.__gt__, "==": int.__eq__}
    return all(ops[op](ctx[attr], k) for attr, op, k in conds)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policies=st.lists(policy, min_size=1, max_size=6),
    a=st.integers(-4, 4),
    b=st.integers(-4, 4),
)
async def test_a_matching_forbid_always_wins(
    policies: list[tuple[str, list[tuple[str, str, int]]]], a: int, b: int
) -> None:
    """For random policy sets and requests: any matching forbid denies (and is the reason), else any
    matching permit allows (and is the reason), else the default deny."""
    text = "\n".join(
        f'@id("p{i}")\n{effect} (principal, action, resource)'
        + (
            " when { " + " && ".join(f"context.{x} {op} {k}" for x, op, k in conds) + " }"
            if conds
            else ""
        )
        + ";"
        for i, (effect, conds) in enumerate(policies)
    )
    bundle = compile_bundle(BundleSource({"schema.cedarschema": SCHEMA, "p.cedar": text}))
    ctx = {"a": a, "b": b}
    engine = PolicyEngine(issuer="x", served_regions=("eu",), observe=False)
    engine.activate(bundle)
    decision, _ = engine.evaluate(
        [DecisionRequest(Entity("P", "p"), "act", Entity("R", "r"), ctx)]
    )[0]
    matching = {
        e: {f"p{i}" for i, (eff, c) in enumerate(policies) if eff == e and _holds(c, ctx)}
        for e in ("permit", "forbid")
    }
    if matching["forbid"]:
        assert not decision.allowed
        assert set(decision.reason_ids) == matching["forbid"]
    elif matching["permit"]:
        assert decision.allowed
        assert set(decision.reason_ids) == matching["permit"]
    else:
        assert (decision.allowed, decision.reason_ids) == (False, ("default_deny",))


@settings(max_examples=60, deadline=None)
@given(
    amount=st.integers(0, 10**12),
    depth=st.integers(0, 2),
    region=st.sampled_from(["eu", "us"]),
    approval=st.booleans(),
    own=st.booleans(),
)
async def test_restricted_instrument_forbid_wins_in_the_default_bundle(
    default_compiled: CompiledBundle,
    amount: int,
    depth: int,
    region: str,
    approval: bool,
    own: bool,
) -> None:
    engine = PolicyEngine(issuer="x", served_regions=("eu",), observe=False)
    engine.activate(default_compiled)
    extra = {"approval_id": "APR-1"} if approval else {}
    subject = client() if own else client("arr-oms", ARR)
    context = trade(amount_minor=amount, delegation_depth=depth, data_region=region, **extra)
    request = DecisionRequest(subject, "order:create", order(restricted=True), context)
    decision, _ = engine.evaluate([request])[0]
    assert not decision.allowed
    assert "instrument.restricted" in decision.reason_ids


# --------------------------------------------------------------------------- recorded


async def test_every_decision_is_recorded_with_its_inputs(services: Services) -> None:
    engine = services.policy.engine
    allowed = await engine.decide(client(), "order:create", order(), trade(), correlation_id="c-1")
    denied = await engine.decide(client(), "order:create", order(restricted=True), trade())
    events = {e["event_id"]: e for e in await recent_events(services.db, 10)}
    assert events[allowed.decision_id]["type"] == "policy:decision:allowed"
    assert events[denied.decision_id]["type"] == "policy:decision:denied"
    event = events[denied.decision_id]
    assert event["reason_ids"] == ["instrument.restricted"]
    assert event["policy_bundle_version"] == engine.version
    assert event["subject"] == 'Client::"nw-oms"'
    assert event["payload"]["action"] == "order:create"
    assert event["payload"]["resource"] == 'Order::"ord-1"'
    assert isinstance(event["payload"]["latency_us"], int)
    assert events[allowed.decision_id]["correlation_id"] == "c-1"
    async with services.db.read() as conn:
        rows = {r.decision_id: r for r in await conn.execute(select(policy_decisions))}
    assert rows[allowed.decision_id].allowed is True
    assert rows[denied.decision_id].reason_ids == "instrument.restricted"
    inputs = orjson.loads(rows[denied.decision_id].inputs)
    assert inputs["request"]["action"] == {"type": "Action", "id": "order:create"}
    assert inputs["request"]["context"]["served_regions"] == ["eu"]
    instrument = next(e for e in inputs["entities"] if e["uid"]["type"] == "Instrument")
    assert instrument["attrs"]["restricted"] is True


async def test_a_decision_that_cannot_be_recorded_is_a_deny(services: Services) -> None:
    await services.writer.stop()  # nothing can be made durable any more
    before = _fail_count("audit_unavailable")
    decision = await services.policy.engine.decide(client(), "order:create", order(), trade())
    assert (decision.allowed, decision.reason_ids) == (False, ("audit_unavailable",))
    assert _fail_count("audit_unavailable") == before + 1
