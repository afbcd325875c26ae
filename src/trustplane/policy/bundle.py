"""Policy bundles: a Cedar schema, Cedar policies and test cases, versioned by content hash.

A bundle is a directory (or the same files stored in the database)::

    schema.cedarschema      the trading domain's entity types, actions and context types
    *.cedar                 policies; every policy carries a unique ``@id("...")``
    tests/*.yaml|yml|json   cases: request -> expected decision and reason ids

The version is the SHA-256 over a canonical listing of the files (sorted relative POSIX paths, each
with the SHA-256 of its bytes), so the same content always has the same version whatever the
directory, file order or time. Compiling a bundle parses the schema and the policies once, validates
the policies against the schema (Cedar's strict validator) and checks the ``@id`` rule; the handles it
returns are what the engine evaluates with, for as long as the bundle is active.

Compiling also slices the policies by action (:func:`policies_by_action`): a request for
``Action::"trade:execute"`` is evaluated against the policies whose action scope can match it, not
against all of them. A policy whose scope names other actions only is never satisfied by that request
(Cedar checks the scope before the conditions, so it cannot raise an error either), so the answer,
its reasons and its errors are the same; the evaluation costs less (the default bundle: 2 to 8 of its
21 policies per request). Whatever the slicer does not recognise keeps every policy. Each slice
also gets an attribute plan (:mod:`trustplane.policy.attribute_slice`): a request is sent to Cedar
with only the attributes the slice's policies can read.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources as pkg_resources
from pathlib import Path

import cedarpy

from trustplane.policy.attribute_slice import AttributePlan, attribute_plans

SCHEMA_FILE = "schema.cedarschema"
TEST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 1 << 20
MAX_FILES = 200


class BundleError(ValueError):
    """The bundle is not usable; ``problems`` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class BundleSource:
    """The files of a bundle (relative POSIX path -> text) and their content hash."""

    files: Mapping[str, str]

    @property
    def version(self) -> str:
        return content_version(self.files)

    @property
    def policy_text(self) -> str:
        return "\n".join(self.files[name] for name in self.policy_files)

    @property
    def policy_files(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".cedar") and "/" not in n)

    @property
    def test_files(self) -> list[str]:
        return sorted(n for n in self.files if n.startswith("tests/") and n.endswith(TEST_SUFFIXES))


@dataclass(frozen=True, slots=True)
class CompiledBundle:
    """Pre-parsed handles for one bundle version: parse once per activation, never per request."""

    source: BundleSource
    version: str
    policies: cedarpy.PolicySet
    schema: cedarpy.Schema
    policy_ids: tuple[str, ...]
    #: the policies each action of the schema can match (:func:`policies_by_action`); an action
    #: not in it is evaluated against ``policies``
    by_action: Mapping[str, cedarpy.PolicySet] = field(default_factory=dict)
    #: per action, its slice's attribute plan (:mod:`trustplane.policy.attribute_slice`): what
    #: Cedar is sent of a request; an action not in it is sent whole
    plans: Mapping[str, AttributePlan] = field(default_factory=dict)

    def policies_for(self, action: str) -> cedarpy.PolicySet:
        return self.by_action.get(action, self.policies)

    @property
    def uses_regions(self) -> bool:
        """Whether the schema declares the ``served_regions`` context attribute the engine fills."""
        return "served_regions" in self.source.files[SCHEMA_FILE]


def content_version(files: Mapping[str, str]) -> str:
    listing = "".join(
        f"{name}\0{hashlib.sha256(files[name].encode()).hexdigest()}\n" for name in sorted(files)
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def load_dir(path: Path) -> BundleSource:
    """Read a bundle directory; unrelated files (README, editor backups) are not part of it."""
    if not path.is_dir():
        raise BundleError([f"{path}: not a directory"])
    names = [p for p in sorted(path.rglob("*")) if p.is_file() and _belongs(p.relative_to(path))]
    if len(names) > MAX_FILES:
        raise BundleError([f"{path}: more than {MAX_FILES} bundle files"])
    files: dict[str, str] = {}
    for file in names:
        if file.stat().st_size > MAX_FILE_BYTES:
            raise BundleError([f"{file}: larger than {MAX_FILE_BYTES} bytes"])
        try:
            files[file.relative_to(path).as_posix()] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError([f"{file}: {exc}"]) from None
    return BundleSource(files)


def _belongs(rel: Path) -> bool:
    parts = rel.parts
    if len(parts) == 1:
        return rel.name == SCHEMA_FILE or rel.suffix == ".cedar"
    return len(parts) == 2 and parts[0] == "tests" and rel.suffix in TEST_SUFFIXES


def default_bundle() -> BundleSource:
    """The bundle shipped inside the package (a copy of the repository's ``policies/``)."""
    root = pkg_resources.files("trustplane.policy").joinpath("default_bundle")
    with pkg_resources.as_file(root) as path:
        return load_dir(Path(path))


def compile_bundle(source: BundleSource) -> CompiledBundle:
    """Parse and validate; raise :class:`BundleError` naming every problem found."""
    if SCHEMA_FILE not in source.files:
        raise BundleError([f"{SCHEMA_FILE} is missing"])
    if not source.policy_files:
        raise BundleError(["the bundle has no .cedar policy file"])
    try:
        schema = cedarpy.Schema.from_str(source.files[SCHEMA_FILE])
    except ValueError as exc:
        raise BundleError([f"{SCHEMA_FILE}: {_first_line(exc)}"]) from None
    problems: list[str] = []
    ids: list[str] = []
    for name in source.policy_files:
        problems.extend(_check_file(name, source.files[name], schema, ids))
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    problems.extend(f"policy @id {i!r} is used more than once" for i in duplicates)
    if problems:
        raise BundleError(problems)
    policies = cedarpy.PolicySet.from_str(source.policy_text)
    by_action = policies_by_action(schema, source.policy_text)
    plans = plans_by_action(schema, source.policy_text)
    return CompiledBundle(source, source.version, policies, schema, tuple(ids), by_action, plans)


# One action declaration as Cedar renders a parsed schema (``str(cedarpy.Schema)``): one per line,
# its parents (if any) as ``Action::"..."`` references in a list.
_ACTION_LINE = re.compile(r'action "((?:[^"\\]|\\.)*)"(?: in \[([^\]]*)\])?(?: appliesTo \{|;)$')
_PARENT = re.compile(r'^Action::"((?:[^"\\]|\\.)*)"$')


def action_ancestors(schema: cedarpy.Schema) -> dict[str, frozenset[str]] | None:
    """Each action of the schema with the action groups it is in, transitively; ``None`` when the
    schema's rendering has anything the slicer does not read (a namespace, an escaped name, a form
    it does not know), so that nothing is sliced on a guess."""
    rendered = str(schema)
    if "namespace " in rendered:
        return None
    parents: dict[str, list[str]] = {}
    for line in rendered.splitlines():
        if not line.startswith("action"):
            continue
        found = _ACTION_LINE.match(line)
        if found is None or "\\" in found.group(1):
            return None
        names: list[str] = []
        for ref in filter(None, (r.strip() for r in (found.group(2) or "").split(","))):
            parent = _PARENT.match(ref)
            if parent is None or "\\" in parent.group(1):
                return None
            names.append(parent.group(1))
        parents[found.group(1)] = names
    closure: dict[str, frozenset[str]] = {}
    for action in parents:
        seen: set[str] = set()
        todo = list(parents[action])
        while todo:
            group = todo.pop()
            if group not in seen:
                seen.add(group)
                todo.extend(parents.get(group, ()))
        closure[action] = frozenset(seen)
    return closure


def _scope_may_match(scope: Mapping[str, object], action: str, groups: frozenset[str]) -> bool:
    """Whether a policy's action scope (Cedar's JSON policy format) can match ``action``, a member
    of ``groups``. Any form but ``==`` / ``in`` on ``Action`` entities is taken to match."""
    op = scope.get("op")
    refs: object = [scope["entity"]] if "entity" in scope else scope.get("entities")
    if op not in ("==", "in") or not isinstance(refs, list) or not refs:
        return True
    ids: list[object] = []
    for ref in refs:
        if not isinstance(ref, Mapping) or ref.get("type") != "Action":
            return True
        ids.append(ref.get("id"))
    if op == "==":
        return action in ids
    return action in ids or not groups.isdisjoint(i for i in ids if isinstance(i, str))


def _slices(
    schema: cedarpy.Schema, policy_text: str
) -> tuple[dict[str, object], dict[str, tuple[str, ...]]] | None:
    """The static policies (Cedar's JSON format) and, for each action of the schema, the ids of
    those whose action scope can match it; None when the schema is not read
    (:func:`action_ancestors`) or the bundle has templates."""
    ancestors = action_ancestors(schema)
    if not ancestors:
        return None
    parsed = json.loads(cedarpy.policies_to_json_str(policy_text))
    static = parsed.get("staticPolicies")
    if not isinstance(static, dict) or parsed.get("templates") or parsed.get("templateLinks"):
        return None
    slices = {
        action: tuple(k for k, p in static.items() if _scope_may_match(p["action"], action, groups))
        for action, groups in ancestors.items()
    }
    return static, slices


def policies_by_action(schema: cedarpy.Schema, policy_text: str) -> dict[str, cedarpy.PolicySet]:
    """For each action of the schema, the policies whose action scope can match it, as one handle
    (actions with the same policies share it). Empty (no slicing: every request is evaluated
    against every policy) when the schema is not read (:func:`action_ancestors`) or the bundle has
    templates."""
    found = _slices(schema, policy_text)
    if found is None:
        return {}
    static, slices = found
    handles: dict[tuple[str, ...], cedarpy.PolicySet] = {}
    out: dict[str, cedarpy.PolicySet] = {}
    for action, keep in slices.items():
        if keep not in handles:
            subset = {"staticPolicies": {k: static[k] for k in keep}, "templates": {}}
            handles[keep] = cedarpy.PolicySet.from_json_str(
                json.dumps({**subset, "templateLinks": []})
            )
        out[action] = handles[keep]
    return out


def plans_by_action(schema: cedarpy.Schema, policy_text: str) -> dict[str, AttributePlan]:
    """For each action whose slice can be sliced by attribute, its plan (actions with the same
    policies share it); empty when the policies are not sliced by action."""
    found = _slices(schema, policy_text)
    if found is None:
        return {}
    static, slices = found
    plans = attribute_plans(schema, static, slices)
    return {a: plan for a, keep in slices.items() if (plan := plans.get(keep)) is not None}


def _check_file(name: str, text: str, schema: cedarpy.Schema, ids: list[str]) -> list[str]:
    try:
        parsed = cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        return [f"{name}: does not parse: {_first_line(exc)}"]
    result = cedarpy.validate_policies(text, schema)
    if not result.validation_passed:
        names = result.id_annotations_by_policy_id
        return [f"{name}: {names.get(e.policy_id, e.policy_id)}: {e.error}" for e in result.errors]
    tree = parsed.to_pst()
    found = [
        p.annotations.get("id") for p in (*tree.static_policies.values(), *tree.templates.values())
    ]
    if not all(found):
        return [f"{name}: every policy needs a non-empty @id(...) annotation"]
    ids.extend(str(i) for i in found)
    return []


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
