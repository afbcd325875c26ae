"""Requests sent to Cedar with only the attributes their action's policies can read
(``policy.attribute_slice``): the decision, its determining policies and its errors must be those of
the whole request, whatever the request carries (wrong types, missing and unknown attributes,
records, sets), and the recorded inputs stay the whole request."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.policy.conftest import NWAM, client, order, order_request
from trustplane.authzen.model import DecisionRequest, Entity
from trustplane.policy import engine as engine_module
from trustplane.policy.attribute_slice import policy_reads
from trustplane.policy.bundle import BundleSource, CompiledBundle, compile_bundle
from trustplane.policy.engine import CedarInput, PolicyEngine, cedar_input, evaluate_inputs

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outcomes(
    bundle: CompiledBundle, inputs: list[CedarInput | None], *, exact: bool = False
) -> list[tuple[Any, ...] | None]:
    """Decision, determining policies, and whether it is an error. Which error Cedar names when a
    request has several is not deterministic (it walks a hash map: the same whole request, asked
    twice, named `legal_entity` then `currency`), so the error itself is compared only ``exact``ly,
    for requests with one fault; a sliced evaluation that errs is evaluated whole anyway."""
    return [
        None
        if o is None
        else (o.allowed, o.reason_ids, o.failure, o.detail)
        if exact
        else (o.allowed, o.reason_ids, o.failure is None)
        for o in evaluate_inputs(bundle, inputs)
    ]


def _same_as_whole(
    bundle: CompiledBundle, requests: list[DecisionRequest], *, exact: bool = False
) -> None:
    assert bundle.plans, "the bundle must be sliced by attribute for this test to mean anything"
    whole = dataclasses.replace(bundle, plans={})
    inputs: list[CedarInput | None] = []
    for request in requests:
        try:
            inputs.append(cedar_input(request, ("eu",) if bundle.uses_regions else None))
        except (TypeError, ValueError):
            inputs.append(None)
    for item in inputs:  # one at a time (the PEP's case), then as one batch
        assert _outcomes(bundle, [item], exact=exact) == _outcomes(whole, [item], exact=exact)
    assert _outcomes(bundle, inputs, exact=exact) == _outcomes(whole, inputs, exact=exact)


# ----------------------------------------------------------------------------- random requests

LEIS = st.sampled_from(["L1", "L2"]).map(lambda i: Entity("LegalEntity", i))
WORDS = st.sampled_from(
    [
        "eu",
        "us",
        "bond",
        "equity",
        "active",
        "revoked",
        "executed",
        "none",
        "created",
        "settlement_submitted",
        "EUR",
        "order:create",
        "allocation:approve",
        "allocation:propose",
        "exception:resolve",
        "create",
        "execute",
        "amend#1",
        "settle",
        "a",
        "b",
        "caf\u00e9",
    ]
)
LONGS = st.sampled_from([0, 1, 2, 3, -1, 1_500_000_000, 2_000_000_000])
REGIONS = st.sampled_from(["eu", "eu", "us"])
ANY = st.recursive(
    st.one_of(WORDS, LONGS, st.sampled_from([2**63 - 1, 2**63, "x\ud800"]), st.booleans(), LEIS),
    lambda inner: st.one_of(
        st.lists(inner, max_size=2),
        st.dictionaries(st.sampled_from(["id", "x", "status"]), inner, max_size=2),
    ),
    max_leaves=4,
)


@st.composite
def _maybe_wrong(draw: st.DrawFn, good: st.SearchStrategy[Any]) -> Any:
    """Mostly a value of the declared type, one time in 25 anything."""
    return draw(ANY) if draw(st.integers(0, 24)) == 0 else draw(good)


@st.composite
def _record(
    draw: st.DrawFn,
    required: dict[str, st.SearchStrategy[Any]],
    optional: dict[str, st.SearchStrategy[Any]] | None = None,
    extra: bool = True,
) -> dict[str, Any]:
    """A record of these members, now and then one required member left out or an unknown one
    added."""
    out = {k: draw(_maybe_wrong(v)) for k, v in required.items()}
    for k, v in (optional or {}).items():
        if draw(st.booleans()):
            out[k] = draw(_maybe_wrong(v))
    if out and draw(st.integers(0, 24)) == 0:
        out.pop(draw(st.sampled_from(sorted(out))))
    if extra and draw(st.integers(0, 24)) == 0:
        out["unknown_member"] = draw(ANY)
    return out


def _entity(kind: str, ids: list[str], req: dict[str, Any], parents: bool = False) -> Any:
    return st.builds(
        Entity,
        st.just(kind),
        st.sampled_from(ids),
        _record(req),
        st.lists(LEIS, max_size=1 if parents else 0).map(tuple),
    )


ACCOUNT = _entity("Account", ["A1", "A2"], {"owner": LEIS}, parents=True)
INSTRUMENT = _entity(
    "Instrument", ["I1", "I2"], {"instrument_class": WORDS, "restricted": st.booleans()}
)
MANDATE_REQ = {"id": WORDS, "version": LONGS, "status": WORDS, "grantor": LEIS, "grantee": LEIS}
MANDATE = _record(
    MANDATE_REQ,
    {"max_amount_minor": LONGS, "instrument_classes": st.lists(WORDS, max_size=2)},
)
EXCHANGE_MANDATE = _record(
    {
        "id": WORDS,
        "version": LONGS,
        "grantor": LEIS,
        "grantee": LEIS,
        "grantee_client": st.builds(Entity, st.just("Client"), st.sampled_from(["c1", "x1"])),
    }
)
TCTX = _record(
    {},
    {
        "type": WORDS,
        "account": WORDS,
        "quantity": LONGS,
        "instrument": WORDS,
        "amount": _record({"amount": LONGS, "currency": WORDS, "minor_units": LONGS}),
    },
)
BUSINESS = {"data_region": REGIONS, "delegation_depth": st.sampled_from([0, 1, 3])}
BUSINESS_OPT = {"mandate": MANDATE, "tctx": TCTX}
TRADE = {**BUSINESS, "amount_minor": LONGS, "currency": WORDS, "instrument_class": WORDS}
SETTLE = {**BUSINESS, "amount_minor": LONGS, "currency": WORDS, "trade_state": WORDS}
STEP = {"trade_state": WORDS, "transition": WORDS, "actor": WORDS}
STEP_OPT = {n: WORDS for n in ("txn", "trade_txn", "amount", "proposer", "mandate_id")}
STEP_OPT["mandate_active"] = st.booleans()
EXCHANGE = {
    n: WORDS
    for n in (
        "audience",
        "subject",
        "subject_issuer",
        "subject_token_type",
        "actor",
        "actor_issuer",
        "exchange_right",
    )
}
EXCHANGE.update(
    requested_scopes=st.lists(WORDS, max_size=2),
    delegation_depth=LONGS,
    impersonation=st.booleans(),
    actor_chain=st.lists(WORDS, max_size=2),
)
TOKEN = {"audience": WORDS, "requested_scopes": st.lists(WORDS, max_size=2), "grant_type": WORDS}
SCOPES = st.lists(WORDS, max_size=3)
CLIENT = _entity("Client", ["x1", "c1"], {"legal_entity": LEIS, "scopes": SCOPES}, parents=True)
USER = _entity("User", ["u1"], {"legal_entity": LEIS}, parents=True)
ORDER = _entity("Order", ["o1"], {"owner": LEIS, "account": ACCOUNT, "instrument": INSTRUMENT})
SETTLEMENT = _entity("Settlement", ["s1"], {"owner": LEIS, "account": ACCOUNT})
REPORT = _entity("Report", ["r1"], {"owner": LEIS})
SCOPE = _entity("Scope", ["order:create", "allocation:approve"], {"name": WORDS, "audience": WORDS})
TRADE_ENTITY = _entity(
    "Trade", ["t1"], {n: WORDS for n in ("state", "account", "instrument", "side", "currency")}
)
# action -> (subjects, resource, required context, optional context)
SHAPES: dict[str, tuple[Any, Any, dict[str, Any], dict[str, Any]]] = {
    "order:create": (st.one_of(CLIENT, USER), ORDER, TRADE, {**BUSINESS_OPT, "approval_id": WORDS}),
    "allocation:approve": (st.one_of(CLIENT, USER), ORDER, TRADE, BUSINESS_OPT),
    "order:cancel": (CLIENT, ORDER, BUSINESS, BUSINESS_OPT),
    "settlement:submit": (st.one_of(CLIENT, USER), SETTLEMENT, SETTLE, BUSINESS_OPT),
    "report:view": (CLIENT, REPORT, BUSINESS, BUSINESS_OPT),
    "token:obtain": (CLIENT, SCOPE, TOKEN, {}),
    "token:exchange": (CLIENT, SCOPE, EXCHANGE, {"mandate": EXCHANGE_MANDATE}),
    "trade:create": (CLIENT, TRADE_ENTITY, STEP, STEP_OPT),
    "trade:approve_allocation": (CLIENT, TRADE_ENTITY, STEP, STEP_OPT),
    "trade:submit_settlement": (CLIENT, TRADE_ENTITY, STEP, STEP_OPT),
    "exception:cancel": (CLIENT, TRADE_ENTITY, STEP, STEP_OPT),
}


@st.composite
def requests(draw: st.DrawFn) -> DecisionRequest:
    action = draw(st.sampled_from(sorted(SHAPES)))
    subjects, resource, required, optional = SHAPES[action]
    if draw(st.integers(0, 24)) == 0:  # another action's entities or context, now and then
        action = draw(st.sampled_from([*SHAPES, "no:such-action"]))
    context = draw(_record(required, optional))
    return DecisionRequest(draw(subjects), action, draw(resource), context)


@SETTINGS
@given(batch=st.lists(requests(), min_size=1, max_size=3))
def test_random_requests_decide_as_the_whole_request_against_the_default_bundle(
    default_compiled: CompiledBundle, batch: list[DecisionRequest]
) -> None:
    _same_as_whole(default_compiled, batch)


def _order_with_account(attrs: dict[str, Any]) -> Entity:
    """An order whose account (which no order policy reads) is an entity with data."""
    base = order()
    account = Entity("Account", "ACC-1", attrs, (NWAM,))
    return Entity("Order", base.id, {**base.attributes, "account": account})


@pytest.mark.parametrize(
    "request_",
    [
        order_request(),
        order_request(
            mandate={
                "id": "M",
                "version": 1,
                "status": "active",
                "grantor": client().id and Entity("LegalEntity", "L1"),
                "grantee": Entity("LegalEntity", "L2"),
                "max_amount_minor": 5,
            }
        ),
        order_request(currency=7),  # a value no policy reads, of the wrong type
        order_request(currency="x\ud800"),  # one orjson cannot write
        order_request(tctx={"amount": {"amount": 1}}),  # a required member missing, unread
        order_request(unknown=1),  # an undeclared context member
        DecisionRequest(client(), "order:create", order(), {"data_region": "eu"}),
        order_request(
            resource=_order_with_account({"owner": NWAM})
        ),  # an entity only the dropped Order.account names
        order_request(resource=_order_with_account({"owner": "NWAM"})),  # malformed
        order_request(resource=_order_with_account({})),  # a required attribute missing
    ],
    ids=[
        "plain",
        "mandate",
        "wrong-type",
        "unwritable",
        "missing-member",
        "undeclared",
        "missing",
        "unreached-entity",
        "unreached-malformed",
        "unreached-incomplete",
    ],
)
def test_chosen_requests_decide_as_the_whole_request(
    default_compiled: CompiledBundle, request_: DecisionRequest
) -> None:
    _same_as_whole(default_compiled, [request_], exact=True)


def test_cedar_gets_only_what_the_order_policies_read(
    default_compiled: CompiledBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    real = engine_module.authorize_batch

    def spy(batch: list[dict[str, Any]], policies: Any, entities: str, schema: Any) -> Any:
        seen.append((orjson.loads(batch[0]["context"]), orjson.loads(entities)))
        return real(batch, policies, entities, schema)

    monkeypatch.setattr(engine_module, "authorize_batch", spy)
    engine = PolicyEngine(issuer="x", served_regions=("eu",), observe=False)
    engine.activate(default_compiled)
    request = order_request(tctx={"type": "order"}, resource=_order_with_account({"owner": NWAM}))
    [(decision, record)] = engine.evaluate([request])
    assert decision.allowed
    [(context, docs)] = seen
    assert "currency" not in context
    assert "tctx" not in context
    assert "amount_minor" in context
    attrs = {d["uid"]["type"]: d["attrs"] for d in docs}
    assert set(attrs["Client"]) == {"legal_entity"}  # scopes: no order policy reads them
    assert set(attrs["Order"]) == {"owner", "instrument"}
    assert attrs["Account"] == {"owner": {"__entity": {"type": "LegalEntity", "id": NWAM.id}}}
    assert all(
        d["parents"] == [{"type": "LegalEntity", "id": client().attributes["legal_entity"].id}]
        for d in docs
        if d["uid"]["type"] == "Client"
    )
    stored = orjson.loads(record.inputs or "")  # the record keeps the whole request
    assert stored["request"]["context"]["currency"] == "EUR"
    assert stored["request"]["context"]["tctx"] == {"type": "order"}
    assert "scopes" in {k for d in stored["entities"] for k in d["attrs"]}


# ----------------------------------------------------------------------------- test bundles

TEST_SCHEMA = """
type Inner = { a: Long, b?: String, deep?: { c: Long, d: Set<String> } };
entity Org;
entity Doc in [Org] = { owner: Org, meta: Inner, tags_: Set<Inner>, label: String, size: Long };
entity Who in [Org] = { org: Org, level: Long, note?: String };
action "read", "write" appliesTo {
  principal: [Who], resource: [Doc],
  context: { n: Long, inner?: Inner, many?: Set<Inner>, free?: String }
};
"""
TEST_POLICIES = {
    # record compared whole: every member of Inner must stay
    "whole": """
        @id("w") permit (principal, action == Action::"read", resource)
        when { context has inner && context.inner == resource.meta };
        @id("n") permit (principal, action == Action::"write", resource) when { context.n > 0 };
    """,
    # reads through an entity reference, with ["attr"] and has, and an entity literal
    "reads": """
        @id("own") permit (principal, action, resource)
        when { resource["owner"] == principal.org && principal.level > 1 };
        @id("deep") forbid (principal, action == Action::"read", resource)
        when { resource.meta has deep && resource.meta.deep.c > 3 };
        @id("lit") forbid (principal, action, resource) when { Who::"boss".level == 9 };
        @id("in") permit (principal, action == Action::"write", resource)
        when { principal in resource.owner };
    """,
    # a set of records used whole
    "sets": """
        @id("s") permit (principal, action, resource)
        when { context has many && resource.tags_.containsAll(context.many) };
        @id("rec") forbid (principal, action, resource) when { {x: context.n}.x == 2 };
    """,
}
INNER = _record(
    {"a": st.sampled_from([1, 2, 5])},
    {
        "b": st.sampled_from(["p", "q"]),
        "deep": _record({"c": LONGS, "d": st.lists(WORDS, max_size=2)}),
    },
)
ORGS = st.sampled_from(["o1", "o2"]).map(lambda i: Entity("Org", i))


@st.composite
def doc_requests(draw: st.DrawFn) -> DecisionRequest:
    who_attrs = draw(_record({"org": ORGS, "level": LONGS}, {"note": WORDS}, extra=False))
    subject = Entity(
        "Who",
        draw(st.sampled_from(["boss", "w1"])),
        who_attrs,
        tuple(draw(st.lists(ORGS, max_size=1))),
    )
    doc = _record(
        {
            "owner": ORGS,
            "meta": INNER,
            "tags_": st.lists(INNER, min_size=1, max_size=2),
            "label": WORDS,
            "size": LONGS,
        }
    )
    resource = Entity("Doc", "d1", draw(doc), tuple(draw(st.lists(ORGS, max_size=1))))
    context = draw(
        _record({"n": LONGS}, {"inner": INNER, "many": st.lists(INNER, max_size=2), "free": WORDS})
    )
    return DecisionRequest(subject, draw(st.sampled_from(["read", "write"])), resource, context)


@pytest.fixture(scope="module")
def test_bundles() -> dict[str, CompiledBundle]:
    return {
        name: compile_bundle(BundleSource({"schema.cedarschema": TEST_SCHEMA, "p.cedar": text}))
        for name, text in TEST_POLICIES.items()
    }


@SETTINGS
@given(
    name=st.sampled_from(sorted(TEST_POLICIES)),
    batch=st.lists(doc_requests(), min_size=1, max_size=3),
)
def test_random_requests_decide_as_the_whole_request_against_test_bundles(
    test_bundles: dict[str, CompiledBundle], name: str, batch: list[DecisionRequest]
) -> None:
    _same_as_whole(test_bundles[name], batch)


def test_a_record_used_whole_keeps_every_member(test_bundles: dict[str, CompiledBundle]) -> None:
    plan = test_bundles["whole"].plans["read"]
    assert {"inner", "meta", "a", "b", "deep", "c", "d"} <= plan.keep
    assert "label" not in plan.keep


def test_the_context_used_whole_is_not_sliced() -> None:
    text = (
        '@id("c") permit (principal, action, resource)'
        " when { (if context.n > 1 then context else context) has free };"
    )
    bundle = compile_bundle(BundleSource({"schema.cedarschema": TEST_SCHEMA, "p.cedar": text}))
    assert bundle.plans == {}
    reads, whole = policy_reads(
        {
            "p": {
                "conditions": [
                    {
                        "kind": "when",
                        "body": {
                            ".": {
                                "left": {".": {"left": {"Var": "context"}, "attr": "inner"}},
                                "attr": "a",
                            }
                        },
                    }
                ]
            }
        }
    )
    assert (reads, whole) == ({"inner", "a"}, {"a"})  # a Long at the top: no record to keep
