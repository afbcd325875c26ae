"""The in-process decision point over Cedar (``cedarpy``).

The active bundle's ``PolicySet`` and ``Schema`` handles are parsed once when the bundle is activated
and reused for every request; only the request's few entities are parsed per call (microseconds).
Switching bundles swaps one reference, so a decision always runs against one whole bundle.

Fail closed, always: a request that cannot be built (a required context attribute missing, an entity
not conforming to the schema, an unknown action), an evaluation error in any policy (Cedar skips an
erroring policy, which for a ``forbid`` would turn into an allow), a ``NoDecision``, an exception from
the engine, or no active bundle all give a deny whose reason id says which, and increment
``trustplane_policy_fail_closed_total``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cedarpy
import orjson
import structlog

from trustplane import metrics
from trustplane.audit_events import AuditEvent, AuditEventType, new_event_id
from trustplane.authzen.model import Decision, DecisionRequest, Entity, FailReason
from trustplane.policy.attribute_slice import AttributePlan
from trustplane.policy.bundle import CompiledBundle
from trustplane.policy.recorder import DecisionRecord, DecisionRecorder

log = structlog.get_logger("trustplane.policy")
TOKEN_ACTION = "token:obtain"
EXCHANGE_ACTION = "token:exchange"
#: Actions decided at the token endpoint: the deployment's served regions are not part of them.
TOKEN_ACTIONS = frozenset({TOKEN_ACTION, EXCHANGE_ACTION})
NO_BUNDLE = "none"
MAX_BATCH = 1000
_ALLOWED = metrics.POLICY_DECISIONS.labels(decision="allow")
_DENIED = metrics.POLICY_DECISIONS.labels(decision="deny")


@dataclass(frozen=True, slots=True)
class CedarInput:
    """One request in Cedar's JSON form; ``entities`` maps each uid to its entity document."""

    request: dict[str, Any]
    entities: dict[tuple[str, str], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the engine concluded for one request, before it is recorded."""

    allowed: bool
    reason_ids: tuple[str, ...]
    failure: FailReason | None = None
    detail: str = ""


def _uid(entity: Entity) -> dict[str, str]:
    return {"type": entity.type, "id": entity.id}


_PLAIN = frozenset({str, int, bool})


def _value(value: Any, out: dict[tuple[str, str], dict[str, Any]]) -> Any:
    cls = value.__class__  # exact types first: this runs for every attribute of every request
    if cls in _PLAIN:
        return value
    if cls is Entity:
        if value.attributes or value.parents:  # a bare reference adds nothing to the set
            _add(value, out)
        return {"__entity": {"type": value.type, "id": value.id}}
    if cls is list or cls is tuple:
        return [v if v.__class__ is str else _value(v, out) for v in value]
    return _value_of_any_type(value, out)


def _value_of_any_type(value: Any, out: dict[tuple[str, str], dict[str, Any]]) -> Any:
    if isinstance(value, Entity):
        _add(value, out)
        return {"__entity": _uid(value)}
    if isinstance(value, Mapping):
        return {str(k): _value(v, out) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_value(v, out) for v in value]
        if not isinstance(value, set | frozenset):
            return items
        if all(item.__class__ is str for item in items):
            return sorted(items)
        return sorted(items, key=orjson.dumps)  # a stable order makes equal sets equal documents
    if isinstance(value, bool | int | str):
        return value
    raise TypeError(f"unsupported attribute value of type {type(value).__name__}")


def _attrs(values: Mapping[str, Any], out: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return {
        k if k.__class__ is str else str(k): v if v.__class__ in _PLAIN else _value(v, out)
        for k, v in values.items()
    }


def _add(entity: Entity, out: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Add an entity (with its attributes and parents) to the request's entity set. An entity that
    appears twice must say the same thing both times; a bare reference adds nothing."""
    parents = entity.parents
    if not entity.attributes and not parents:
        return
    doc = {
        "uid": {"type": entity.type, "id": entity.id},
        "attrs": _attrs(entity.attributes, out),
        "parents": [{"type": p.type, "id": p.id} for p in parents],
    }
    for parent in parents:
        if parent.attributes or parent.parents:
            _add(parent, out)
    found = out.setdefault((entity.type, entity.id), doc)
    if found is not doc and found != doc:
        raise ValueError(f"entity {entity.uid} appears twice with different attributes")


def cedar_input(request: DecisionRequest, served_regions: Sequence[str] | None) -> CedarInput:
    """The Cedar request and entities. When the bundle's schema uses ``served_regions``, every action
    but ``token:obtain``/``token:exchange`` gets the deployment's regions there (a fact of this PDP, not of the caller:
    it overrides whatever the caller sent)."""
    entities: dict[tuple[str, str], dict[str, Any]] = {}
    subject, resource = request.subject, request.resource
    _add(subject, entities)
    _add(resource, entities)
    context = _attrs(request.context, entities)
    if served_regions is not None and request.action not in TOKEN_ACTIONS:
        context["served_regions"] = list(served_regions)
    cedar = {
        "principal": {"type": subject.type, "id": subject.id},
        "action": {"type": "Action", "id": request.action},
        "resource": {"type": resource.type, "id": resource.id},
        "context": context,
    }
    return CedarInput(cedar, entities)


def classify(error: str) -> FailReason:
    """Map a Cedar diagnostic to the fail-closed reason recorded with the deny."""
    if "failed to build request" in error:
        if "attribute" in error:
            return FailReason.MISSING_ATTRIBUTE
        return FailReason.INVALID_REQUEST
    if "does not conform to the schema" in error or "does not exist" in error:
        return FailReason.MISSING_ATTRIBUTE
    if "failed to parse entities" in error:
        return FailReason.INVALID_REQUEST
    return FailReason.ENGINE_ERROR


def _detail(error: str) -> str:
    """The diagnostic without the entity document Cedar echoes back (it can be long)."""
    if error.startswith("failed to parse entities from:"):
        error = "failed to parse entities: " + error.rsplit("]: ", 1)[-1]
    return error[:300]


def outcome_of(result: cedarpy.AuthzResult) -> Outcome:
    """The outcome of one answer of cedarpy's public ``is_authorized_batch``."""
    diagnostics = result.diagnostics
    return _outcome(
        result.decision.value,
        diagnostics.reasons,
        diagnostics.id_annotations_by_reason,
        diagnostics.errors,
    )


def outcome_of_answer(answer: Mapping[str, Any]) -> Outcome:
    """The outcome of one answer of the extension's ``is_authorized_batch`` (its JSON, parsed)."""
    diagnostics = answer.get("diagnostics") or {}
    return _outcome(
        answer.get("decision"),
        diagnostics.get("reason") or (),
        diagnostics.get("id_annotations_by_reason") or {},
        diagnostics.get("errors") or (),
    )


def _outcome(
    decision: object, reasons: Iterable[str], names: Mapping[str, str], errors: Sequence[str]
) -> Outcome:
    if errors:
        return Outcome(False, (), classify(errors[0]), _detail(errors[0]))
    ids = tuple(sorted(names.get(p, p) for p in reasons))
    if decision == "Allow":
        return Outcome(True, ids)
    if decision == "Deny":
        return Outcome(False, ids or (FailReason.DEFAULT_DENY.value,))
    return Outcome(False, (), FailReason.NO_DECISION)


def _public_batch(
    requests: list[dict[str, Any]], policies: cedarpy.PolicySet, entities: str, schema: Any
) -> list[Outcome]:
    results = cedarpy.is_authorized_batch(requests, policies, entities, schema=schema)
    return [outcome_of(r) for r in results]


def _native_batch_or_none() -> Callable[..., list[str]] | None:
    """cedarpy's extension entry point, if it answers a probe as Cedar must.

    The public ``is_authorized_batch`` hands the requests to the extension, reads each answer with
    ``json.loads`` and wraps it in ``AuthzResult`` objects; calling the extension and reading the
    answers with orjson saves ~15-20 us of a ~150 us decision. The extension is cedarpy's private
    API, so it is used only when it exists and answers a probe as Cedar must (an allow and a deny
    with their policy ids, a request error); otherwise every decision takes the public call."""
    try:
        from cedarpy import _internal
    except ImportError:  # pragma: no cover - a cedarpy without its extension module
        return None
    native = getattr(_internal, "is_authorized_batch", None)
    if not callable(native):  # pragma: no cover - a cedarpy that renamed its entry point
        return None
    try:
        policies = cedarpy.PolicySet.from_str(_PROBE_POLICIES)
        schema = cedarpy.Schema.from_str(_PROBE_SCHEMA)
        answers = native(_PROBE_REQUESTS, policies, _PROBE_ENTITIES, schema, False)
        seen = [outcome_of_answer(orjson.loads(a)) for a in answers]
    except Exception:  # an extension with another calling convention or answer format
        return None
    found = [(o.allowed, o.reason_ids, o.failure) for o in seen]
    return native if found == _PROBE_OUTCOMES else None


_PROBE_SCHEMA = """
entity User { level: Long };
action "read" appliesTo { principal: [User], resource: [User], context: { n: Long } };
"""
_PROBE_POLICIES = """
@id("probe.permit") permit (principal, action, resource) when { principal.level > 1 };
@id("probe.forbid") forbid (principal, action, resource) when { context.n == 7 };
"""
_PROBE_ENTITIES = '[{"uid":{"type":"User","id":"a"},"attrs":{"level":2},"parents":[]}]'
_PROBE_REQUESTS = [
    {
        "principal": {"type": "User", "id": "a"},
        "action": {"type": "Action", "id": "read"},
        "resource": {"type": "User", "id": "a"},
        "context": context,
    }
    for context in ('{"n": 1}', '{"n": 7}', '{"m": 1}')
]
_PROBE_OUTCOMES = [
    (True, ("probe.permit",), None),
    (False, ("probe.forbid",), None),
    (False, (), FailReason.MISSING_ATTRIBUTE),
]
_NATIVE_BATCH = _native_batch_or_none()


def authorize_batch(
    requests: list[dict[str, Any]], policies: cedarpy.PolicySet, entities: str, schema: Any
) -> list[Outcome]:
    """Cedar's answers to ``requests`` (contexts as JSON text) over one entity set, as outcomes.
    Raises what cedarpy raises: callers turn an exception into a fail-closed deny."""
    if _NATIVE_BATCH is None:
        return _public_batch(requests, policies, entities, schema)
    answers = _NATIVE_BATCH(requests, policies, entities, schema, False)
    return [outcome_of_answer(orjson.loads(a)) for a in answers]


def failed(reason: FailReason, detail: str = "") -> Outcome:
    return Outcome(False, (), reason, detail[:300])


def group_by_entities(
    inputs: Sequence[CedarInput | None],
) -> Iterable[tuple[list[int], list[dict[str, Any]]]]:
    """Batches of request indices whose entity sets agree (same uid -> same document), with the
    union of their entities: one ``is_authorized_batch`` call each."""
    indices: list[int] = []
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for i, item in enumerate(inputs):
        if item is None:
            continue
        clash = any(merged.get(k, doc) != doc for k, doc in item.entities.items())
        if indices and (clash or len(indices) >= MAX_BATCH):
            yield indices, list(merged.values())
            indices, merged = [], {}
        indices.append(i)
        merged.update(item.entities)
    if indices:
        yield indices, list(merged.values())


def _present(item: CedarInput | None) -> CedarInput:
    assert item is not None  # group_by_entities only yields indices of present inputs
    return item


def _with_json_context(request: dict[str, Any]) -> dict[str, Any]:
    return {**request, "context": orjson.dumps(request["context"]).decode()}


def _evaluate_one(bundle: CompiledBundle | None, cedar: CedarInput) -> Outcome:
    """One built request, as :func:`evaluate_inputs` would evaluate it, without the batching."""
    if bundle is None:
        return failed(FailReason.NO_ACTIVE_BUNDLE)
    request = cedar.request
    return _authorize(bundle, request["action"]["id"], [request], list(cedar.entities.values()))[0]


def _authorize(
    bundle: CompiledBundle,
    action: str,
    requests: list[dict[str, Any]],
    entities: list[dict[str, Any]],
) -> list[Outcome]:
    """Cedar's outcomes for requests of one action over one entity set: sent with only the
    attributes the action's policies can read when the bundle has a plan for it and the sliced
    evaluation ends without an error (:mod:`trustplane.policy.attribute_slice`), else whole."""
    plan = bundle.plans.get(action)
    if plan is not None:
        sliced = _sliced(plan, action, requests, entities)
        if sliced is not None:
            return sliced
    try:
        # The context goes to Cedar as JSON text: orjson here instead of cedarpy's json.dumps.
        whole = [_with_json_context(r) for r in requests]
        entities_json = orjson.dumps(entities).decode()
        return authorize_batch(whole, bundle.policies_for(action), entities_json, bundle.schema)
    except Exception as exc:  # the engine must never turn an error into an allow
        return [failed(FailReason.ENGINE_ERROR, repr(exc))] * len(requests)


def _sliced(
    plan: AttributePlan,
    action: str,
    requests: list[dict[str, Any]],
    entities: list[dict[str, Any]],
) -> list[Outcome] | None:
    """The outcomes with only what the policies read sent; None when a value left out is not
    certainly valid, or any outcome is an error (the caller then sends the requests whole, so an
    error is always the whole request's)."""
    try:
        docs = plan.entity_docs(entities)
        contexts = [plan.context(action, r["context"]) for r in requests]
        if docs is None or any(c is None for c in contexts):
            return None
        batch = [
            {**r, "context": orjson.dumps(c).decode()}
            for r, c in zip(requests, contexts, strict=True)
        ]
        outcomes = authorize_batch(batch, plan.policies, orjson.dumps(docs).decode(), plan.schema)
    except Exception:  # whatever it is, the whole request meets it again
        return None
    return None if any(o.failure is not None for o in outcomes) else outcomes


def _by_action(
    inputs: Sequence[CedarInput | None], indices: list[int]
) -> Iterable[tuple[str, list[int]]]:
    """``indices`` split by their request's action (one batch call per action: each evaluated
    against that action's policies only), in first-seen order."""
    actions = [_present(inputs[i]).request["action"]["id"] for i in indices]
    if len(set(actions)) == 1:
        return [(actions[0], indices)]
    split: dict[str, list[int]] = {}
    for i, action in zip(indices, actions, strict=True):
        split.setdefault(action, []).append(i)
    return split.items()


def evaluate_inputs(
    bundle: CompiledBundle, inputs: Sequence[CedarInput | None]
) -> list[Outcome | None]:
    """Evaluate prepared inputs (``None`` entries are skipped and stay ``None``)."""
    outcomes: list[Outcome | None] = [None] * len(inputs)
    groups: Iterable[tuple[list[int], list[dict[str, Any]]]]
    if len(inputs) == 1 and inputs[0] is not None:
        groups = [([0], list(inputs[0].entities.values()))]
    else:
        groups = group_by_entities(inputs)
    for indices, entities in groups:
        for action, members in _by_action(inputs, indices):
            requests = [_present(inputs[i]).request for i in members]
            batch = _authorize(bundle, action, requests, entities)
            for i, outcome in zip(members, batch, strict=True):
                outcomes[i] = outcome
    return outcomes


class PolicyEngine:
    """Implements :class:`~trustplane.authzen.model.DecisionPoint` in process."""

    def __init__(
        self,
        *,
        issuer: str,
        served_regions: Sequence[str],
        recorder: DecisionRecorder | None = None,
        observe: bool = True,
    ) -> None:
        """``observe=False`` (bundle tests, simulation): no metrics, no fail-closed log lines."""
        self._issuer = issuer
        self._observe = observe
        self._served = tuple(served_regions)
        self._recorder = recorder
        self.bundle: CompiledBundle | None = None

    @property
    def version(self) -> str:
        return self.bundle.version if self.bundle else NO_BUNDLE

    def activate(self, bundle: CompiledBundle) -> None:
        """Switch to ``bundle`` (one reference swap: in-flight decisions finish on the old one)."""
        self.bundle = bundle

    def evaluate(
        self, requests: Sequence[DecisionRequest]
    ) -> list[tuple[Decision, DecisionRecord]]:
        """Decide without writing: the decisions and the records that must be made durable."""
        inputs, outcomes, version, latency_us = self._conclude(requests)
        return [
            self.record(r, i, o, version, latency_us)
            for r, i, o in zip(requests, inputs, outcomes, strict=True)
        ]

    def _conclude(
        self, requests: Sequence[DecisionRequest]
    ) -> tuple[list[CedarInput | None], list[Outcome], str, int]:
        """Each request's Cedar input (None if it could not be built) and outcome, the bundle
        version they were decided with, and the latency per request in microseconds."""
        started = time.perf_counter_ns()
        bundle = self.bundle
        regions = self._served if bundle is None or bundle.uses_regions else None
        version = bundle.version if bundle else NO_BUNDLE
        if len(requests) == 1:  # the PEP's and the AuthZEN single evaluation's case
            try:
                built_one = cedar_input(requests[0], regions)
            except (TypeError, ValueError) as exc:
                outcome = failed(FailReason.INVALID_REQUEST, str(exc))
                return [None], [outcome], version, (time.perf_counter_ns() - started) // 1000
            outcome = _evaluate_one(bundle, built_one)
            return [built_one], [outcome], version, (time.perf_counter_ns() - started) // 1000
        inputs: list[CedarInput | None] = []
        built: list[Outcome | None] = []
        for request in requests:
            try:
                inputs.append(cedar_input(request, regions))
                built.append(None)
            except (TypeError, ValueError) as exc:
                inputs.append(None)
                built.append(failed(FailReason.INVALID_REQUEST, str(exc)))
        if bundle is None:
            evaluated: list[Outcome | None] = [failed(FailReason.NO_ACTIVE_BUNDLE)] * len(inputs)
        else:
            evaluated = evaluate_inputs(bundle, inputs)
        final = [
            o or e or failed(FailReason.NO_DECISION) for o, e in zip(built, evaluated, strict=True)
        ]
        latency_us = (time.perf_counter_ns() - started) // 1000 // max(1, len(requests))
        return inputs, final, version, latency_us

    def record(
        self,
        request: DecisionRequest,
        cedar: CedarInput | None,
        outcome: Outcome,
        version: str,
        latency_us: int,
    ) -> tuple[Decision, DecisionRecord]:
        decision = self._decision(request, outcome, version)
        return decision, self._record(request, cedar, decision, outcome, latency_us)

    def _decision(self, request: DecisionRequest, outcome: Outcome, version: str) -> Decision:
        decision_id = new_event_id()
        reason_ids = (outcome.failure.value,) if outcome.failure else outcome.reason_ids
        if self._observe:
            self._observe_outcome(request, outcome, decision_id)
        return Decision(outcome.allowed, reason_ids, version, decision_id)

    def _observe_outcome(
        self, request: DecisionRequest, outcome: Outcome, decision_id: str
    ) -> None:
        (_ALLOWED if outcome.allowed else _DENIED).inc()
        if outcome.failure is not None:
            metrics.POLICY_FAIL_CLOSED.labels(reason=outcome.failure.value).inc()
            log.warning(
                "policy_fail_closed",
                reason=outcome.failure.value,
                detail=outcome.detail,
                action=request.action,
                principal=request.subject.uid,
                resource=request.resource.uid,
                decision_id=decision_id,
            )

    def _record(
        self,
        request: DecisionRequest,
        cedar: CedarInput | None,
        decision: Decision,
        outcome: Outcome,
        latency_us: int,
    ) -> DecisionRecord:
        mandate = request.context.get("mandate")
        mandate = mandate if isinstance(mandate, Mapping) else {}
        event = AuditEvent(
            type=AuditEventType.POLICY_DECISION_ALLOWED
            if decision.allowed
            else AuditEventType.POLICY_DECISION_DENIED,
            issuer=self._issuer,
            subject=request.subject.uid,
            client_id=request.subject.id if request.subject.type == "Client" else None,
            correlation_id=request.correlation_id,
            transaction_id=request.transaction_id,
            mandate_id=str(mandate["id"]) if "id" in mandate else None,
            decision="allow" if decision.allowed else "deny",
            reason=outcome.failure.value if outcome.failure else None,
            reason_ids=decision.reason_ids,
            policy_bundle_version=decision.bundle_version,
            service="trustplane.policy",
            payload={
                "action": request.action,
                "resource": request.resource.uid,
                "latency_us": latency_us,
            },
            event_id=decision.decision_id,
        )
        stored = (
            orjson.dumps(
                {"request": cedar.request, "entities": list(cedar.entities.values())}
            ).decode()
            if cedar is not None
            else None
        )
        return DecisionRecord(event, request.action, request.resource.uid, latency_us, stored)

    async def decide(
        self,
        subject: Entity,
        action: str,
        resource: Entity,
        context: Mapping[str, Any],
        *,
        correlation_id: str | None = None,
        transaction_id: str | None = None,
    ) -> Decision:
        request = DecisionRequest(
            subject, action, resource, context, correlation_id, transaction_id
        )
        return (await self.decide_many([request]))[0]

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        """Decide and make every decision's record durable before answering; if the records cannot
        be written, every answer is a deny (a decision that leaves no trace is not given).
        Without a recorder nothing is written, so no record is built."""
        if self._recorder is None:
            _, outcomes, version, _ = self._conclude(requests)
            return [self._decision(r, o, version) for r, o in zip(requests, outcomes, strict=True)]
        pairs = self.evaluate(requests)
        try:
            await self._recorder.record([r for _, r in pairs])
        except Exception as exc:
            log.error("policy_decision_not_recorded", error=repr(exc), count=len(pairs))
            metrics.POLICY_FAIL_CLOSED.labels(reason=FailReason.AUDIT_UNAVAILABLE.value).inc(
                len(pairs)
            )
            return [
                Decision(
                    False, (FailReason.AUDIT_UNAVAILABLE.value,), d.bundle_version, d.decision_id
                )
                for d, _ in pairs
            ]
        return [d for d, _ in pairs]
