"""The policies sliced by action (``policy.bundle.policies_by_action``): a request is evaluated
against the policies whose action scope can match it. The answer, its reasons and its errors must
be the full set's; anything the slicer does not read keeps every policy."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.policy.conftest import client, order, order_request, trade
from trustplane.authzen.model import DecisionRequest, Entity
from trustplane.policy import engine as engine_module
from trustplane.policy.bundle import (
    BundleSource,
    CompiledBundle,
    action_ancestors,
    compile_bundle,
    policies_by_action,
)
from trustplane.policy.engine import PolicyEngine, cedar_input, evaluate_inputs

# Groups: "all" > "write" > {"create", "amend"}; "read" in "all"; "audit" in no group; "both" in
# two groups.
SCHEMA = """
entity P; entity R;
action "all";
action "write" in ["all"];
action "create", "amend" in ["write"] appliesTo { principal: [P], resource: [R], context: { n: Long } };
action "read" in ["all"] appliesTo { principal: [P], resource: [R], context: { n: Long } };
action "both" in ["write", "read"] appliesTo { principal: [P], resource: [R], context: { n: Long } };
action "audit" appliesTo { principal: [P], resource: [R], context: { n: Long } };
"""
ACTIONS = ("create", "amend", "read", "both", "audit")
SCOPES = (
    "action",
    'action == Action::"create"',
    'action == Action::"audit"',
    'action in Action::"write"',
    'action in Action::"all"',
    'action in Action::"read"',
    'action in [Action::"amend", Action::"read"]',
    'action in [Action::"audit"]',
    'action in Action::"both"',
)


def _raw(bundle: CompiledBundle, request: DecisionRequest, *, sliced: bool) -> tuple[object, ...]:
    item = cedar_input(request, None)
    cedar = {**item.request, "context": orjson.dumps(item.request["context"]).decode()}
    entities = orjson.dumps(list(item.entities.values())).decode()
    policies = bundle.policies_for(request.action) if sliced else bundle.policies
    [outcome] = engine_module.authorize_batch([cedar], policies, entities, bundle.schema)
    return (outcome.allowed, outcome.reason_ids, outcome.failure, outcome.detail)


def test_the_schema_rendering_gives_each_action_its_groups() -> None:
    bundle = compile_bundle(BundleSource({"schema.cedarschema": SCHEMA, "p.cedar": ""}))
    assert action_ancestors(bundle.schema) == {
        "all": frozenset(),
        "write": {"all"},
        "create": {"write", "all"},
        "amend": {"write", "all"},
        "read": {"all"},
        "both": {"write", "read", "all"},
        "audit": frozenset(),
    }


def test_the_default_bundle_is_sliced_by_action(default_compiled: CompiledBundle) -> None:
    sizes = {action: len(p) for action, p in default_compiled.by_action.items()}
    assert sizes["token:obtain"] == 2
    assert sizes["order:create"] == 8
    assert max(sizes.values()) < len(default_compiled.policies) == 21
    assert default_compiled.policies_for("no:such-action") is default_compiled.policies


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policies=st.lists(
        st.tuples(
            st.sampled_from(["permit", "forbid"]),
            st.sampled_from(SCOPES),
            st.sampled_from(["", " when { context.n > 0 }", " when { context.n < 1 }"]),
        ),
        min_size=1,
        max_size=7,
    ),
    n=st.integers(-1, 2),
)
def test_a_slice_answers_as_every_policy_would(
    policies: list[tuple[str, str, str]], n: int
) -> None:
    """Random policies over an action hierarchy (groups of groups, an action in two groups, one in
    none): for every action, the slice's answer, reasons and errors are the full set's, and a policy
    left out of a slice is one whose scope cannot match the action."""
    text = "\n".join(
        f'@id("p{i}") {effect} (principal, {scope}, resource){when};'
        for i, (effect, scope, when) in enumerate(policies)
    )
    bundle = compile_bundle(BundleSource({"schema.cedarschema": SCHEMA, "p.cedar": text}))
    assert set(bundle.by_action) >= set(ACTIONS)
    for action in ACTIONS:
        for context in ({"n": n}, {}):  # {}: a request error, the same with either set
            request = DecisionRequest(Entity("P", "p"), action, Entity("R", "r"), context)
            assert _raw(bundle, request, sliced=True) == _raw(bundle, request, sliced=False)


def test_a_forbid_on_a_group_of_groups_stays_in_the_members_slice() -> None:
    """The case a wrong slice would turn into an allow: a forbid scoped to the outer group."""
    text = """
    @id("allow") permit (principal, action == Action::"create", resource);
    @id("stop") forbid (principal, action in Action::"all", resource) when { context.n > 0 };
    """
    bundle = compile_bundle(BundleSource({"schema.cedarschema": SCHEMA, "p.cedar": text}))
    assert len(bundle.policies_for("create")) == 2
    assert len(bundle.policies_for("audit")) == 0
    engine = PolicyEngine(issuer="x", served_regions=("eu",), observe=False)
    engine.activate(bundle)
    [(denied, _), (allowed, _)] = engine.evaluate(
        [
            DecisionRequest(Entity("P", "p"), "create", Entity("R", "r"), {"n": 1}),
            DecisionRequest(Entity("P", "p"), "create", Entity("R", "r"), {"n": 0}),
        ]
    )
    assert (denied.allowed, denied.reason_ids) == (False, ("stop",))
    assert (allowed.allowed, allowed.reason_ids) == (True, ("allow",))


@pytest.mark.parametrize(
    ("schema", "text"),
    [
        pytest.param(
            "namespace Desk { entity P; entity R; "
            'action "go" appliesTo { principal: [P], resource: [R] }; }',
            '@id("a") permit (principal, action == Desk::Action::"go", resource);',
            id="namespace",
        ),
        pytest.param(
            SCHEMA,
            '@id("t") permit (principal == ?principal, action == Action::"read", resource);',
            id="template",
        ),
        pytest.param(
            SCHEMA.replace('"audit"', '"au\\"dit"'),
            '@id("a") permit (principal, action, resource);',
            id="escaped-name",
        ),
    ],
)
def test_what_the_slicer_does_not_read_keeps_every_policy(schema: str, text: str) -> None:
    source = BundleSource({"schema.cedarschema": schema, "p.cedar": text})
    bundle = compile_bundle(source)
    assert bundle.by_action == {}
    assert policies_by_action(bundle.schema, source.policy_text) == {}
    assert bundle.policies_for("read") is bundle.policies


def test_default_bundle_requests_answer_as_every_policy_would(
    default_compiled: CompiledBundle,
) -> None:
    """The default bundle's situations, every action of its schema, and an action entity with
    parents smuggled in as an attribute: the slice's answer is the full set's each time."""
    smuggled = Entity("Action", "token:obtain", {}, (Entity("Action", "business"),))
    requests = [
        order_request(),
        order_request(resource=order(restricted=True)),
        order_request(amount_minor=2_000_000_000),
        order_request(data_region="us"),
        order_request(note=smuggled),
        DecisionRequest(client(), "order:create", order(), {"data_region": "eu"}),
    ]
    requests += [
        DecisionRequest(client(), action, order(), trade()) for action in default_compiled.by_action
    ]
    for request in requests:
        assert _raw(default_compiled, request, sliced=True) == _raw(
            default_compiled, request, sliced=False
        )


def test_a_batch_of_several_actions_is_evaluated_per_action(
    default_compiled: CompiledBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One entity set, three actions: one call per action with that action's slice, and the
    outcomes in the requests' order, as each request alone would have."""
    requests = [
        order_request(),
        DecisionRequest(client(), "report:view", order(), trade()),
        order_request(amount_minor=2_000_000_000),
        DecisionRequest(client(), "settlement:submit", order(), trade()),
    ]
    inputs = [cedar_input(r, ("eu",)) for r in requests]
    calls: list[tuple[list[str], int]] = []
    real = engine_module.authorize_batch

    def counting(batch: list[dict[str, object]], policies: object, *rest: object) -> object:
        calls.append(([r["action"]["id"] for r in batch], len(policies)))  # type: ignore[arg-type,index]
        return real(batch, policies, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "authorize_batch", counting)
    together = evaluate_inputs(default_compiled, inputs)
    sizes = {a: len(p) for a, p in default_compiled.by_action.items()}
    assert calls == [
        (["order:create", "order:create"], sizes["order:create"]),
        (["report:view"], sizes["report:view"]),
        (["settlement:submit"], sizes["settlement:submit"]),
    ]
    alone = [evaluate_inputs(default_compiled, [i])[0] for i in inputs]
    assert together == alone
