"""OpenID AuthZEN Authorization API 1.0, the wire side: JSON <-> ``Entity``/``Decision``, shared by
the HTTP PDP (``trustplane.policy.http``) and the remote PDP client a PEP uses
(:class:`trustplane.pep.authzen.AuthzenClient`).

Information model (§5): a subject and a resource are ``{"type", "id", "properties"}``, an action is
``{"name", "properties"}``, the context is an object. trustplane's extensions, which other PDPs ignore
as unknown fields (§10.1.1 "receivers MUST ignore unknown fields"):

- an entity may carry ``"parents": [entity, ...]`` (Cedar membership, e.g. a client's legal entity);
- a property value ``{"__entity": {"type": T, "id": I}}`` is a reference to another entity (the
  Cedar JSON escape); it may carry that entity's own ``properties`` and ``parents`` (an order's
  instrument and whether it is restricted, say);
- an evaluation may carry ``"transaction_id"`` (the business transaction, a token's ``txn``) and
  ``"correlation_id"`` (the id its decision is recorded under; without it, the request's
  ``X-Request-ID``): a batch of questions from different callers keeps each caller's id.

Values nest at most ``MAX_DEPTH`` levels: deeper input is a 400, not a recursion error.

Lengths: an entity's ``type`` and ``id`` are at most ``MAX_ID_LENGTH`` characters, but the subject's at
most ``MAX_SUBJECT_PART`` each and ``transaction_id`` at most ``MAX_TRANSACTION_ID``: every decision is
recorded in the ledger, whose leaves index the subject (``Type::"id"``, 256 characters), a client's id
(128) and the transaction (128). A longer value was answered 200, and its ledger entry then failed
every integration on PostgreSQL (``value too long``): one caller's request stopped the ledger.

Action ``properties`` are not used by trustplane's policies (put request data in ``context``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeGuard

import orjson

from trustplane.authzen.model import Decision, DecisionRequest, Entity
from trustplane.errors import InvalidRequestError

MAX_EVALUATIONS = 100
MAX_PARENTS = 16
MAX_ID_LENGTH = 512
#: The subject's ``type`` and ``id`` (module doc): ``Type::"id"`` fits the ledger's 256 characters,
#: and a ``Client``'s id its 128.
MAX_SUBJECT_PART = 126
#: trustplane's extension member ``transaction_id`` (module doc): the ledger's 128 characters.
MAX_TRANSACTION_ID = 128
MAX_DEPTH = 16
#: The longest correlation id (a longer ``X-Request-ID`` is cut to this by the HTTP PDP).
MAX_CORRELATION_ID = 256
SEMANTICS = ("execute_all", "deny_on_first_deny", "permit_on_first_permit")


# --------------------------------------------------------------------------- JSON -> model

#: A JSON string token, and (group 1) the ``:`` after it when it is a member name. Outside strings a
#: JSON text has no quote, so scanning from the left meets every string token from its start.
_STRING_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"([ \t\n\r]*:)?')

#: A quote and whitespace: perhaps a member name spaced from its colon.
_SPACED = (b'" ', b'"\n', b'"\t', b'"\r')


def repeats_a_member_name(raw: bytes, parsed: object) -> bool:
    """Whether an object of the JSON text ``raw`` names a member twice (§11.5: I-JSON, RFC 7493
    §2.3): the parser kept one of them (orjson: the last), so an intermediary that read the other
    saw another request. Exact: ``parsed`` has fewer members than ``raw`` names only if a name
    repeats.

    The common text (no backslash, so no escape and every quote delimits a string; no quote
    followed by whitespace, so no name spaced from its colon) is compared with ``parsed`` serialised again, counting ``":`` in both: each
    member name gives one, and so does each string opening with a colon. The strings of both are the
    same bytes (nothing to escape), except those of a member dropped as a repeat, which only lower
    the second count; so the counts differ exactly when a member was dropped. Any other text is
    counted token by token."""
    if b"\\" not in raw and not any(spaced in raw for spaced in _SPACED):
        return raw.count(b'":') != orjson.dumps(parsed).count(b'":')
    tokens = _STRING_TOKEN.findall(raw)
    return len(tokens) - tokens.count(b"") != _members(parsed)


def _members(parsed: object) -> int:
    members, stack = 0, [parsed]
    while stack:  # no recursion: orjson parses deeper nesting than Python's recursion limit
        value = stack.pop()
        if type(value) is dict:
            members += len(value)
            stack.extend(v for v in value.values() if type(v) is dict or type(v) is list)
        elif type(value) is list:
            stack.extend(v for v in value if type(v) is dict or type(v) is list)
    return members


def _object(value: object, where: str, *, required: bool = True) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where} must be a JSON object")
    return value


def _text(entity: dict[str, Any], key: str, where: str, limit: int = MAX_ID_LENGTH) -> str:
    value = entity.get(key)
    if type(value) is not str or not value:
        raise InvalidRequestError(f"{where}.{key} must be a non-empty string")
    if len(value) > limit:
        raise InvalidRequestError(f"{where}.{key} must be at most {limit} characters")
    return value


#: JSON scalars need no conversion; checked by exact type on the hot path (bool is not int here).
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _value(value: Any, depth: int = 0) -> Any:
    if type(value) in _SCALARS:
        return value
    if depth > MAX_DEPTH:
        raise InvalidRequestError(f"values may nest at most {MAX_DEPTH} levels deep")
    if type(value) is dict:
        ref = value.get("__entity")
        if len(value) == 1 and type(ref) is dict:
            return entity_from_json(ref, "__entity", depth=depth + 1)
        return {k: _value(v, depth + 1) for k, v in value.items()}
    return [_value(v, depth + 1) for v in value]  # orjson gives nothing else than a list here


def entity_from_json(
    value: object, where: str, *, depth: int = 0, limit: int = MAX_ID_LENGTH
) -> Entity:
    """An entity (§5.1, §5.2); ``limit``: the longest ``type`` and ``id`` (module doc)."""
    if type(value) is not dict:
        raise InvalidRequestError(f"{where} must be a JSON object")
    if depth > MAX_DEPTH:
        raise InvalidRequestError(f"entities may nest at most {MAX_DEPTH} levels deep")
    properties = value.get("properties")
    if properties is None:
        attributes: dict[str, Any] = {}
    elif type(properties) is dict:
        attributes = {k: _value(v, depth + 1) for k, v in properties.items()}
    else:
        raise InvalidRequestError(f"{where}.properties must be a JSON object")
    parents = value.get("parents")
    if parents is None:
        members: tuple[Entity, ...] = ()
    elif type(parents) is list and len(parents) <= MAX_PARENTS:
        members = tuple(
            entity_from_json(p, f"{where}.parents[{i}]", depth=depth + 1)
            for i, p in enumerate(parents)
        )
    else:
        raise InvalidRequestError(f"{where}.parents must be an array of at most {MAX_PARENTS}")
    kind, ident = _text(value, "type", where, limit), _text(value, "id", where, limit)
    return Entity(kind, ident, attributes, members)


def action_from_json(value: object, where: str) -> str:
    raw = _object(value, where)
    _object(raw.get("properties"), f"{where}.properties", required=False)
    return _text(raw, "name", where)


def request_from_json(
    raw: Mapping[str, Any], where: str, correlation_id: str | None
) -> DecisionRequest:
    """One evaluation (§6.1); a missing subject, action or resource is a 400 (§10.1.1).

    Well-formed input takes :func:`_parsed_request`, which builds no error text; anything it does not
    accept is parsed again by :func:`_checked_request`, which says where the problem is.
    ``correlation_id`` is the request's (its ``X-Request-ID``); the evaluation's own
    ``correlation_id`` member, if any, replaces it."""
    own = raw.get("correlation_id")
    if own is not None:
        if type(own) is not str or not own or len(own) > MAX_CORRELATION_ID:
            raise InvalidRequestError(
                f"{where}correlation_id must be a string of 1 to {MAX_CORRELATION_ID} characters"
            )
        correlation_id = own
    try:
        return _parsed_request(raw, correlation_id)
    except _Malformed:
        return _checked_request(raw, where, correlation_id)


def _checked_request(
    raw: Mapping[str, Any], where: str, correlation_id: str | None
) -> DecisionRequest:
    for key in ("subject", "action", "resource"):
        if raw.get(key) is None:
            raise InvalidRequestError(f"{where}{key} is required")
    return DecisionRequest(
        entity_from_json(raw["subject"], f"{where}subject", limit=MAX_SUBJECT_PART),
        action_from_json(raw["action"], f"{where}action"),
        entity_from_json(raw["resource"], f"{where}resource"),
        _context(raw.get("context"), f"{where}context"),
        correlation_id,
        _transaction_id(raw.get("transaction_id"), where),
    )


def _context(value: object, where: str) -> dict[str, Any]:
    """The context is an object of attributes; ``{"__entity": ...}`` there would make it an entity."""
    context = _object(value, where, required=False)
    if len(context) == 1 and type(context.get("__entity")) is dict:
        raise InvalidRequestError(f"{where} must be a JSON object of attributes, not an entity")
    return {k: _value(v, 1) for k, v in context.items()}


# --------------------------------------------------------------------------- the fast path


class _Malformed(Exception):
    """Raised by the fast path for anything :func:`_checked_request` would refuse (it then runs to
    find the field and raise the 400)."""


def _parsed_request(raw: Mapping[str, Any], correlation_id: str | None) -> DecisionRequest:
    """:func:`_checked_request`'s result for input it accepts, without building location strings;
    the same rules, checked in one pass."""
    action = raw.get("action")
    if type(action) is not dict:
        raise _Malformed
    name, action_properties = action.get("name"), action.get("properties")
    if not _is_id(name) or (action_properties is not None and type(action_properties) is not dict):
        raise _Malformed
    context = raw.get("context")
    if context is None:
        context = {}
    elif type(context) is dict and not (len(context) == 1 and "__entity" in context):
        context = {k: v if type(v) in _SCALARS else _fast_value(v, 1) for k, v in context.items()}
    else:
        raise _Malformed
    transaction_id = raw.get("transaction_id")
    if transaction_id is not None and not _is_id(transaction_id, MAX_TRANSACTION_ID):
        raise _Malformed
    return DecisionRequest(
        _fast_entity(raw.get("subject"), 0, MAX_SUBJECT_PART),
        name,
        _fast_entity(raw.get("resource"), 0),
        context,
        correlation_id,
        transaction_id,
    )


def _is_id(value: object, limit: int = MAX_ID_LENGTH) -> TypeGuard[str]:
    return type(value) is str and 0 < len(value) <= limit


def _fast_value(value: Any, depth: int) -> Any:
    if type(value) in _SCALARS:
        return value
    if depth > MAX_DEPTH:
        raise _Malformed
    if type(value) is dict:
        ref = value.get("__entity")
        if len(value) == 1 and type(ref) is dict:
            return _fast_entity(ref, depth + 1)
        return {k: _fast_value(v, depth + 1) for k, v in value.items()}
    return [_fast_value(v, depth + 1) for v in value]


def _fast_entity(value: object, depth: int, limit: int = MAX_ID_LENGTH) -> Entity:
    if type(value) is not dict or depth > MAX_DEPTH:
        raise _Malformed
    kind, ident = value.get("type"), value.get("id")
    if not (_is_id(kind, limit) and _is_id(ident, limit)):
        raise _Malformed
    properties = value.get("properties")
    if properties is None:
        attributes: dict[str, Any] = {}
    elif type(properties) is dict:
        deeper = depth + 1
        attributes = {
            k: v if type(v) in _SCALARS else _fast_value(v, deeper) for k, v in properties.items()
        }
    else:
        raise _Malformed
    parents = value.get("parents")
    if parents is None:
        return Entity(kind, ident, attributes)
    if type(parents) is not list or len(parents) > MAX_PARENTS:
        raise _Malformed
    members = tuple([_fast_entity(p, depth + 1) for p in parents])
    return Entity(kind, ident, attributes, members)


def _transaction_id(value: object, where: str) -> str | None:
    """trustplane's extension member ``transaction_id`` (a token's ``txn``): optional, a string."""
    if value is None:
        return None
    if type(value) is not str or not value:
        raise InvalidRequestError(f"{where}transaction_id must be a non-empty string")
    if len(value) > MAX_TRANSACTION_ID:
        raise InvalidRequestError(
            f"{where}transaction_id must be at most {MAX_TRANSACTION_ID} characters"
        )
    return value


def evaluations_from_json(
    body: Mapping[str, Any], correlation_id: str | None
) -> tuple[list[DecisionRequest], str] | None:
    """The batch (§7.1) with top-level defaults applied (§7.1.1: a key given in an evaluation
    replaces the default), and the evaluations semantic (§7.1.2). None: no ``evaluations`` array (or
    an empty one), so the request is a single evaluation."""
    items = body.get("evaluations")
    if items is None or items == []:
        return None
    if not isinstance(items, list):
        raise InvalidRequestError("evaluations must be an array")
    if len(items) > MAX_EVALUATIONS:
        raise InvalidRequestError(f"at most {MAX_EVALUATIONS} evaluations per request")
    options = _object(body.get("options"), "options", required=False)
    semantic = options.get("evaluations_semantic", "execute_all")
    if semantic not in SEMANTICS:
        raise InvalidRequestError(
            f"options.evaluations_semantic must be one of {', '.join(SEMANTICS)}"
        )
    keys = ("subject", "action", "resource", "context", "transaction_id", "correlation_id")
    defaults = {k: body[k] for k in keys if k in body}
    requests = [
        request_from_json(
            {**defaults, **_object(item, f"evaluations[{i}]")}, f"evaluations[{i}].", correlation_id
        )
        for i, item in enumerate(items)
    ]
    return requests, semantic


# --------------------------------------------------------------------------- model -> JSON


def decision_to_json(decision: Decision) -> dict[str, Any]:
    return {
        "decision": decision.allowed,
        "context": {
            "decision_id": decision.decision_id,
            "reason_ids": list(decision.reason_ids),
            "bundle_version": decision.bundle_version,
        },
    }


def _value_to_json(value: Any) -> Any:
    cls = value.__class__  # exact types first: the ABC checks below are slow
    if cls in _SCALARS:
        return value
    if cls is dict:
        return {k: _value_to_json(v) for k, v in value.items()}
    if cls is list:
        return [v if v.__class__ is str else _value_to_json(v) for v in value]
    if isinstance(value, Entity):
        return {"__entity": entity_to_json(value)}
    if isinstance(value, Mapping):
        return {k: _value_to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_value_to_json(v) for v in value]
    return value


def entity_to_json(entity: Entity) -> dict[str, Any]:
    out: dict[str, Any] = {"type": entity.type, "id": entity.id}
    if entity.attributes:
        out["properties"] = _value_to_json(entity.attributes)
    if entity.parents:
        out["parents"] = [entity_to_json(p) for p in entity.parents]
    return out


def request_to_json(request: DecisionRequest) -> dict[str, Any]:
    body = {
        "subject": entity_to_json(request.subject),
        "action": {"name": request.action},
        "resource": entity_to_json(request.resource),
        "context": _value_to_json(request.context),
    }
    if request.transaction_id is not None:
        body["transaction_id"] = request.transaction_id
    return body


def decision_from_json(body: object) -> Decision:
    """A PDP's answer; anything but a boolean ``decision`` is a ``ValueError``."""
    if not isinstance(body, dict) or not isinstance(body.get("decision"), bool):
        raise ValueError("the PDP answer has no boolean decision")
    context = body.get("context")
    if not isinstance(context, dict):
        context = {}
    reasons = context.get("reason_ids", [])
    return Decision(
        body["decision"],
        tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
        str(context.get("bundle_version", "")),
        str(context.get("decision_id", "")),
    )
