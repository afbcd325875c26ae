"""OpenID AuthZEN Authorization API 1.0, the wire side: JSON <-> ``Entity``/``Decision``, shared by
the HTTP PDP (``trustplane.policy.http``) and the remote PDP client a PEP uses (:class:`AuthzenClient`).

Information model (§5): a subject and a resource are ``{"type", "id", "properties"}``, an action is
``{"name", "properties"}``, the context is an object. trustplane's extensions, which other PDPs ignore
as unknown fields (§12.1.1 "receivers MUST ignore unknown fields"):

- an entity may carry ``"parents": [entity, ...]`` (Cedar membership, e.g. a client's legal entity);
- a property value ``{"__entity": {"type": T, "id": I}}`` is a reference to another entity (the
  Cedar JSON escape); it may carry that entity's own ``properties`` and ``parents`` (an order's
  instrument and whether it is restricted, say).

Values nest at most ``MAX_DEPTH`` levels: deeper input is a 400, not a recursion error.

Action ``properties`` are not used by trustplane's policies (put request data in ``context``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import structlog

from trustplane.errors import InvalidRequestError
from trustplane.outbound import OutboundError, OutboundFetcher, OutboundPolicy
from trustplane.pep import metrics
from trustplane.pep.client_auth import ClientAuth
from trustplane.pep.keys import check_url
from trustplane.policy.model import Decision, DecisionRequest, Entity, FailReason
from trustplane.tracing.spans import inject_headers

log = structlog.get_logger("trustplane.pep")
MAX_EVALUATIONS = 100
MAX_PARENTS = 16
MAX_ID_LENGTH = 512
MAX_DEPTH = 16
#: A batch answer of MAX_EVALUATIONS decisions is far below this.
MAX_ANSWER_BYTES = 256 * 1024
SEMANTICS = ("execute_all", "deny_on_first_deny", "permit_on_first_permit")


# --------------------------------------------------------------------------- JSON -> model


def _object(value: object, where: str, *, required: bool = True) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where} must be a JSON object")
    return value


def _text(entity: dict[str, Any], key: str, where: str) -> str:
    value = entity.get(key)
    if type(value) is not str or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidRequestError(f"{where}.{key} must be a non-empty string")
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


def entity_from_json(value: object, where: str, *, depth: int = 0) -> Entity:
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
    return Entity(_text(value, "type", where), _text(value, "id", where), attributes, members)


def action_from_json(value: object, where: str) -> str:
    raw = _object(value, where)
    _object(raw.get("properties"), f"{where}.properties", required=False)
    return _text(raw, "name", where)


def request_from_json(
    raw: Mapping[str, Any], where: str, correlation_id: str | None
) -> DecisionRequest:
    """One evaluation (§6.1); a missing subject, action or resource is a 400 (§12.1.1)."""
    for key in ("subject", "action", "resource"):
        if raw.get(key) is None:
            raise InvalidRequestError(f"{where}{key} is required")
    return DecisionRequest(
        entity_from_json(raw["subject"], f"{where}subject"),
        action_from_json(raw["action"], f"{where}action"),
        entity_from_json(raw["resource"], f"{where}resource"),
        _value(_object(raw.get("context"), f"{where}context", required=False)),
        correlation_id,
        _transaction_id(raw.get("transaction_id"), where),
    )


def _transaction_id(value: object, where: str) -> str | None:
    """trustplane's extension member ``transaction_id`` (a token's ``txn``): optional, a string."""
    if value is None:
        return None
    if type(value) is not str or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidRequestError(f"{where}transaction_id must be a non-empty string")
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
    keys = ("subject", "action", "resource", "context", "transaction_id")
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


# --------------------------------------------------------------------------- remote client


class AuthzenClient:
    """A :class:`~trustplane.policy.model.DecisionPoint` that asks a remote AuthZEN PDP over HTTP.

    It authenticates with an access token for the PDP's audience, obtained by client credentials at
    ``token_endpoint`` (scope ``decision:evaluate``) and reused until shortly before it expires.
    Like every decision point it never raises: a PDP that cannot be reached, or answers anything but a
    decision, gives a deny with reason ``pdp_unreachable`` (fail closed) and increments
    ``trustplane_pep_pdp_unavailable_total``. Decisions are recorded by the PDP, not here.
    """

    def __init__(
        self,
        pdp: str,
        *,
        token_endpoint: str,
        auth: ClientAuth,
        audience: str | None = None,
        scope: str = "decision:evaluate",
        fetcher: OutboundFetcher | None = None,
        timeout: float = 2.0,
    ) -> None:
        self._own_fetcher = fetcher is None
        policy = OutboundPolicy(read_timeout=timeout, total_timeout=2 * timeout)
        self._fetcher = fetcher or OutboundFetcher(policy)
        self.pdp = check_url(pdp.rstrip("/"), "PDP URL", self._fetcher)
        self._token_endpoint = check_url(token_endpoint, "token endpoint", self._fetcher)
        self._auth, self._scope = auth, scope
        self._audience = audience or f"{self.pdp}/access/v1"
        self._token: tuple[str, float] | None = None

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
        body = await self._post("/access/v1/evaluation", request_to_json(request), correlation_id)
        try:
            return decision_from_json(body)
        except ValueError as exc:
            return self._unreachable(repr(exc))

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        if not requests:
            return []
        payload = {"evaluations": [request_to_json(r) for r in requests]}
        body = await self._post("/access/v1/evaluations", payload, requests[0].correlation_id)
        answers = body.get("evaluations") if isinstance(body, dict) else None
        try:
            if not isinstance(answers, list) or len(answers) != len(requests):
                raise ValueError("the PDP answered a different number of evaluations")
            return [decision_from_json(a) for a in answers]
        except ValueError as exc:
            return [self._unreachable(repr(exc)) for _ in requests]

    async def _post(self, path: str, payload: object, correlation_id: str | None) -> object:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if correlation_id:
            headers["X-Request-ID"] = correlation_id
        inject_headers(headers)  # W3C traceparent of the caller's span, if any
        content = orjson.dumps(payload)
        try:
            for attempt in (1, 2):
                headers["Authorization"] = f"Bearer {await self._access_token()}"
                response = await self._fetcher.request(
                    "POST", self.pdp + path, purpose="pep_pdp", content=content,
                    headers=headers, max_bytes=MAX_ANSWER_BYTES,
                )  # fmt: skip
                if response.status != 401 or attempt == 2:
                    break
                self._token = None  # expired or revoked early: retry once with a fresh token
            if response.status != 200:
                return {"error": f"status {response.status}"}
            return response.json()
        except (OutboundError, ValueError) as exc:
            return {"error": repr(exc)}

    async def _access_token(self) -> str:
        if self._token is not None and self._token[1] > time.monotonic():
            return self._token[0]
        form = {"grant_type": "client_credentials", "scope": self._scope}
        form["resource"] = self._audience
        headers = {"Accept": "application/json"}
        self._auth.apply(form, headers)
        inject_headers(headers)
        response = await self._fetcher.request(
            "POST", self._token_endpoint, purpose="pep_token", data=form, headers=headers
        )
        body = response.json() if response.status == 200 else {}
        body = body if isinstance(body, dict) else {}
        token, lifetime = body.get("access_token"), body.get("expires_in", 60)
        if not isinstance(token, str) or not isinstance(lifetime, int):
            raise ValueError(f"token endpoint answered {response.status}")
        # Renew a little early so a token never expires between here and the PDP.
        self._token = (token, time.monotonic() + max(lifetime - 30, lifetime / 2))
        return token

    def _unreachable(self, error: str) -> Decision:
        metrics.PEP_PDP_UNAVAILABLE.inc()
        log.error("pdp_unreachable", pdp=self.pdp, error=error)
        return Decision(False, (FailReason.PDP_UNREACHABLE.value,), "", uuid.uuid4().hex)

    async def aclose(self) -> None:
        if self._own_fetcher:
            await self._fetcher.aclose()
