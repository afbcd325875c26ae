"""A bundle's tests are data: ``tests/*.yaml`` (or ``.json``) files of cases, each a request and the
expected decision and, optionally, the exact reason ids::

    served_regions: [eu]          # optional, the deployment this file assumes (default [eu])
    cases:
      - name: own legal entity may create an order
        principal: {type: Client, id: c-1, attributes: {...}, parents: [{type: LegalEntity, id: L}]}
        action: order:create
        resource: {type: Order, id: o-1, attributes: {...}}
        context: {amount_minor: 100, ...}
        expect: allow             # or deny
        reasons: [entity.own]     # optional: the exact set of reason ids

Inside ``attributes`` and ``context``, ``{__entity: {type: T, id: I, attributes: {...}}}`` is an entity
reference (Cedar's JSON escape); YAML anchors keep files short. The same cases run in ``trustplane
policy test``, before every publish, and in the project's test suite.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import yaml

from trustplane.authzen.model import DecisionRequest, Entity
from trustplane.policy.bundle import BundleError, CompiledBundle
from trustplane.policy.engine import PolicyEngine

DEFAULT_REGIONS = ("eu",)


@dataclass(frozen=True, slots=True)
class Case:
    file: str
    name: str
    request: DecisionRequest
    expect_allow: bool
    reasons: frozenset[str] | None
    served_regions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    name: str
    passed: bool
    problem: str = ""


def entity_from_data(data: Any, where: str) -> Entity:
    """An :class:`Entity` from ``{type, id, attributes?, parents?}`` (bundle tests, simulation)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("type"), str):
        raise BundleError([f"{where}: an entity needs 'type' and 'id'"])
    if not isinstance(data.get("id"), str | int):
        raise BundleError([f"{where}: an entity needs 'type' and 'id'"])
    attributes = data.get("attributes") or {}
    parents = data.get("parents") or []
    if not isinstance(attributes, Mapping) or not isinstance(parents, list):
        raise BundleError([f"{where}: 'attributes' must be a mapping and 'parents' a list"])
    return Entity(
        data["type"],
        str(data["id"]),
        {str(k): value_from_data(v, where) for k, v in attributes.items()},
        tuple(entity_from_data(p, where) for p in parents),
    )


def value_from_data(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"__entity"}:
            return entity_from_data(value["__entity"], where)
        return {str(k): value_from_data(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [value_from_data(v, where) for v in value]
    return value


def load_cases(bundle: CompiledBundle) -> list[Case]:
    cases: list[Case] = []
    for name in bundle.source.test_files:
        text = bundle.source.files[name]
        try:
            doc = orjson.loads(text) if name.endswith(".json") else yaml.safe_load(text)
        except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
            raise BundleError([f"{name}: not valid {name.rsplit('.', 1)[-1]}: {exc}"]) from None
        if not isinstance(doc, Mapping) or not isinstance(doc.get("cases"), list):
            raise BundleError([f"{name}: expected a mapping with a 'cases' list"])
        regions = tuple(doc.get("served_regions") or DEFAULT_REGIONS)
        for i, raw in enumerate(doc["cases"]):
            cases.append(_case(name, i, raw, regions))
    return cases


def _case(file: str, index: int, raw: Any, regions: tuple[str, ...]) -> Case:
    where = f"{file} case {index + 1}"
    if not isinstance(raw, Mapping):
        raise BundleError([f"{where}: a case must be a mapping"])
    where = f"{file}: {raw.get('name', index + 1)}"
    expect = raw.get("expect")
    if expect not in ("allow", "deny") or not isinstance(raw.get("action"), str):
        raise BundleError([f"{where}: needs 'action' and 'expect: allow|deny'"])
    reasons = raw.get("reasons")
    if reasons is not None and not (
        isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)
    ):
        raise BundleError([f"{where}: 'reasons' must be a list of reason ids"])
    context = value_from_data(raw.get("context") or {}, where)
    request = DecisionRequest(
        entity_from_data(raw.get("principal"), where),
        raw["action"],
        entity_from_data(raw.get("resource"), where),
        context,
    )
    name = str(raw.get("name", f"case {index + 1}"))
    return Case(
        file,
        name,
        request,
        expect == "allow",
        frozenset(reasons) if reasons is not None else None,
        regions,
    )


def run_cases(bundle: CompiledBundle) -> list[CaseResult]:
    """Run every case of the bundle against the bundle itself (nothing is recorded). Each file
    names the deployment regions it assumes, so results never depend on local settings."""
    results: list[CaseResult] = []
    engines: dict[tuple[str, ...], PolicyEngine] = {}
    for case in load_cases(bundle):
        regions = case.served_regions
        engine = engines.get(regions)
        if engine is None:
            engine = engines[regions] = PolicyEngine(
                issuer="test", served_regions=regions, observe=False
            )
            engine.activate(bundle)
        decision, _ = engine.evaluate([case.request])[0]
        results.append(_judge(case, decision.allowed, decision.reason_ids))
    return results


def _judge(case: Case, allowed: bool, reasons: tuple[str, ...]) -> CaseResult:
    got = "allow" if allowed else "deny"
    want = "allow" if case.expect_allow else "deny"
    if allowed != case.expect_allow:
        return CaseResult(
            case.file, case.name, False, f"expected {want}, got {got} {list(reasons)}"
        )
    if case.reasons is not None and frozenset(reasons) != case.reasons:
        return CaseResult(
            case.file,
            case.name,
            False,
            f"expected reasons {sorted(case.reasons)}, got {sorted(reasons)}",
        )
    return CaseResult(case.file, case.name, True)
