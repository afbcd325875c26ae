"""Send Cedar only the attribute values the policies of a request's action slice can read.

Cedar's cost per decision follows the number of values a request carries (every attribute and
context value, each member of a record or set, is parsed and probed for an ``__extn`` escape), not
the number of policies. So, for each action slice (:func:`trustplane.policy.bundle.policies_by_action`),
compiling a bundle computes from the policies' AST (Cedar's JSON policy format) the attribute names
any of them can read: ``.attr`` and ``["attr"]``, ``has attr``, record literal keys. A request is
then sent with only the entity attributes and context members whose name is in that set, by name at
every depth (an ``owner`` read anywhere keeps every ``owner``), and evaluated against a schema
derived from the bundle's with every other attribute declaration removed. Every entity is kept with
its parents (the hierarchy ``in`` reads), so every entity a policy can reach is still there.

Why the answer is the same as with everything sent (:class:`AttributePlan`):

- a policy reads only names in the set, so every value it reads, every ``has`` and every entity it
  can reach are the same;
- a value used whole (compared, put in a set, passed to a function) whose declared type holds a
  record keeps every member of that record type (equality of records compares every member); the
  ``context`` record used whole keeps every attribute (no slicing);
- the values left out are checked here against the bundle's own schema as Cedar would check them
  (declared, the declared type, required ones present); a value this check is not sure of sends the
  request whole instead, so a malformed value no policy reads is refused as before;
- a sliced evaluation that ends in any error is evaluated again whole, so errors and their texts are
  the whole request's.

Whatever the slicer does not read (a namespace, an AST node it does not know, a schema form the
parser below does not know, a name both a common type and an entity type) gets no plan: the action's
requests go to Cedar whole. The recorded inputs (``policy_decisions``) are always the whole request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import cedarpy

from trustplane.policy.schema_text import ParsedSchema, Unsupported, parse_schema

_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1


def _records_in(t: Any) -> Iterator[Any]:
    """Every record type within ``t`` (through sets and records, not through entity references)."""
    if t[0] == "record":
        yield t
        for _, sub in t[1].values():
            yield from _records_in(sub)
    elif t[0] == "set":
        yield from _records_in(t[1])


def conforms(value: Any, t: Any) -> bool:
    """Whether Cedar certainly accepts ``value`` (Cedar's JSON form) as a value of type ``t``;
    False when not sure."""
    kind, cls = t[0], value.__class__
    if kind == "str":
        return cls is str and (value.isascii() or _utf8(value))
    if kind == "long":
        return cls is int and _LONG_MIN <= value <= _LONG_MAX
    if kind == "bool":
        return cls is bool
    if kind == "set":
        return cls is list and all(conforms(v, t[1]) for v in value)
    if kind == "entity":
        ref = value.get("__entity") if cls is dict and len(value) == 1 else None
        if ref.__class__ is not dict or len(ref) != 2 or ref.get("type") != t[1]:
            return False
        uid = ref.get("id")
        return uid.__class__ is str and _utf8(uid) and (t[2] is None or uid in t[2])
    if kind == "record":
        fields = t[1]
        if cls is not dict or not all(k in fields for k in value):
            return False
        return all(
            conforms(value[k], sub) if k in value else not required
            for k, (required, sub) in fields.items()
        )
    return False


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# ----------------------------------------------------------------------------- what policies read


def _walk(node: Any, reads: set[str], whole: set[str], used_whole: bool) -> None:
    """Collect the attribute names an expression reads and those whose value it uses whole (not
    only to read a member of it). Raises :class:`Unsupported` on a node it does not know."""
    if not isinstance(node, dict) or len(node) != 1:
        raise Unsupported(f"policy expression {node!r:.80}")
    ((key, body),) = node.items()
    if key == "Value":
        return
    if key == "Var":
        if body == "context" and used_whole:
            raise Unsupported("the context used whole")
        return
    if key in (".", "has"):
        reads.add(body["attr"])
        if key == "." and used_whole:
            whole.add(body["attr"])
        _walk(body["left"], reads, whole, False)
        return
    for child in _children(key, body, reads):
        _walk(child, reads, whole, True)


def _children(key: str, body: Any, reads: set[str]) -> list[Any]:
    if key in ("!", "neg", "isEmpty"):
        return [body["arg"]]
    if key == "like":
        return [body["left"]]
    if key == "is":
        return [body["left"], *([body["in"]] if "in" in body else [])]
    if key == "if-then-else":
        return [body["if"], body["then"], body["else"]]
    if key == "Set" and isinstance(body, list):
        return body
    if key == "Record" and isinstance(body, dict):
        reads.update(body)
        return list(body.values())
    if key in ("Slot", "Unknown"):
        raise Unsupported(f"policy expression {key}")
    if isinstance(body, dict) and set(body) == {"left", "right"}:
        return [body["left"], body["right"]]  # ==, in, <, &&, +, contains, getTag, ...
    if isinstance(body, list):
        return body  # an extension function call: its arguments are used whole
    raise Unsupported(f"policy expression {key}")


def policy_reads(policies: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """The names the policies (Cedar's JSON policy format, ``staticPolicies``) read, and those of
    values they use whole."""
    reads: set[str] = set()
    whole: set[str] = set()
    for policy in policies.values():
        for condition in policy.get("conditions", ()):
            _walk(condition["body"], reads, whole, True)
    return reads, whole


# ----------------------------------------------------------------------------- the plan


@dataclass(slots=True)
class _Shape:
    """How to slice one record (an entity's attributes or a record value) of a declared type."""

    keep: frozenset[str]
    nested: dict[str, Any] = field(default_factory=dict)  # kept name -> ("record"|"set", _Shape)
    drop: dict[str, Any] = field(default_factory=dict)  # declared, not read -> resolved type
    required: tuple[str, ...] = ()  # declared, required, not read

    def apply(self, value: dict[str, Any]) -> dict[str, Any] | None:
        """The record without what is not read; None when a value left out is not certainly one
        Cedar accepts (then the request goes whole)."""
        out: dict[str, Any] = {}
        keep, nested, drop = self.keep, self.nested, self.drop
        for k, v in value.items():
            if k in keep:
                sub = nested.get(k)
                if sub is not None:
                    v = _apply_nested(sub, v)
                    if v is None:
                        return None
                out[k] = v
            elif k not in drop or not conforms(v, drop[k]):
                return None
        for k in self.required:
            if k not in value:
                return None
        return out


def _apply_nested(nested: tuple[str, _Shape], value: Any) -> Any:
    kind, shape = nested
    if kind == "record":
        if value.__class__ is not dict or "__entity" in value or "__extn" in value:
            return value  # not a record: Cedar refuses it, and the request is evaluated whole
        return shape.apply(value)
    if value.__class__ is not list:
        return value
    out = []
    for item in value:
        sliced = _apply_nested(("record", shape), item)
        if sliced is None:
            return None
        out.append(sliced)
    return out


def _shape(record: Any, keep: frozenset[str], memo: dict[int, _Shape | None]) -> _Shape | None:
    """The shape for a resolved record type, None when nothing in it (at any depth) is left out."""
    if id(record) in memo:
        return memo[id(record)]
    shape = _Shape(keep=frozenset(n for n in record[1] if n in keep))
    for name, (required, sub) in record[1].items():
        if name not in keep:
            shape.drop[name] = sub
            if required:
                shape.required += (name,)
            continue
        nested = _nested(sub, keep, memo)
        if nested is not None:
            shape.nested[name] = nested
    found = shape if shape.drop or shape.nested else None
    memo[id(record)] = found
    return found


def _nested(t: Any, keep: frozenset[str], memo: dict[int, _Shape | None]) -> Any:
    if t[0] == "record":
        inner = _shape(t, keep, memo)
        return None if inner is None else ("record", inner)
    if t[0] == "set" and t[1][0] == "record":
        inner = _shape(t[1], keep, memo)
        return None if inner is None else ("set", inner)
    if t[0] == "set" and t[1][0] == "set" and next(_records_in(t[1]), None) is not None:
        raise Unsupported("a set of sets of records")
    return None


@dataclass(frozen=True, slots=True)
class AttributePlan:
    """One action slice: its policies, the schema without the attributes they cannot read, and
    how to slice each entity type's attributes and each action's context."""

    policies: cedarpy.PolicySet
    schema: cedarpy.Schema
    keep: frozenset[str]
    entities: Mapping[str, _Shape]
    contexts: Mapping[str, _Shape | None]

    def entity_docs(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        out: list[dict[str, Any]] = []
        shapes = self.entities
        for doc in docs:
            uid: Any = doc.get("uid")
            shape = shapes.get(uid.get("type", "")) if uid.__class__ is dict else None
            attrs = doc.get("attrs")
            if shape is None or attrs.__class__ is not dict:
                out.append(doc)
                continue
            sliced = shape.apply(attrs)
            if sliced is None:
                return None
            out.append({**doc, "attrs": sliced})
        return out

    def context(self, action: str, context: Any) -> Any:
        """The context without what is not read (None: send the request whole)."""
        if action not in self.contexts:
            return None
        shape = self.contexts[action]
        if shape is None or context.__class__ is not dict:
            return context
        return shape.apply(context)


def attribute_plans(
    schema: cedarpy.Schema, static: Mapping[str, Any], slices: Mapping[str, tuple[str, ...]]
) -> dict[tuple[str, ...], AttributePlan | None]:
    """A plan per slice (the ids of its policies, as :func:`policies_by_action` keys them); None for
    a slice that cannot be sliced by attribute. Empty when the schema is not one this module reads."""
    try:
        parsed = parse_schema(str(schema))
        entity_types = {n: parsed.resolve(s) for n, s in parsed.entities.items() if s is not None}
        context_types = {a: parsed.resolve(c) for a, c in parsed.contexts.items()}
        declared = _declared_types(parsed)
    except (Unsupported, KeyError):
        return {}
    plans: dict[tuple[str, ...], AttributePlan | None] = {}
    actions_of: dict[tuple[str, ...], list[str]] = {}
    for action, keep in slices.items():
        actions_of.setdefault(keep, []).append(action)
    for ids, actions in actions_of.items():
        try:
            plans[ids] = _plan(parsed, static, ids, actions, entity_types, context_types, declared)
        except (Unsupported, KeyError, TypeError):
            plans[ids] = None
    return plans


def _declared_types(parsed: ParsedSchema) -> dict[str, list[Any]]:
    """Every attribute name of the schema with each type it is declared with (any depth)."""
    found: dict[str, list[Any]] = {}
    roots = [*parsed.common.values(), *parsed.entities.values(), *parsed.contexts.values()]
    for root in roots:
        if root is None:
            continue
        for record in _records_in(parsed.resolve(root)):
            for name, (_, sub) in record[1].items():
                found.setdefault(name, []).append(sub)
    return found


def _plan(
    parsed: ParsedSchema,
    static: Mapping[str, Any],
    ids: tuple[str, ...],
    actions: list[str],
    entity_types: Mapping[str, Any],
    context_types: Mapping[str, Any],
    declared: Mapping[str, list[Any]],
) -> AttributePlan | None:
    reads, whole = policy_reads({i: static[i] for i in ids})
    keep = set(reads)
    for name in whole:  # a record used whole keeps every member of its type, at every depth
        for t in declared.get(name, ()):
            for record in _records_in(t):
                keep.update(record[1])
    frozen = frozenset(keep)
    memo: dict[int, _Shape | None] = {}
    entities = {n: s for n, t in entity_types.items() if (s := _shape(t, frozen, memo)) is not None}
    contexts = {a: _shape(context_types[a], frozen, memo) for a in actions if a in context_types}
    if not entities and not any(contexts.values()):
        return None  # nothing to leave out
    text = parsed.without(frozen)
    subset = {"staticPolicies": {k: static[k] for k in ids}, "templates": {}, "templateLinks": []}
    return AttributePlan(
        cedarpy.PolicySet.from_json_str(json.dumps(subset)),
        cedarpy.Schema.from_str(text),
        frozen,
        entities,
        contexts,
    )
