"""The HTTP PDP: OpenID AuthZEN Authorization API 1.0 over the decision point.

- ``POST /access/v1/evaluation`` (§6): one decision;
- ``POST /access/v1/evaluations`` (§7): a batch, top-level defaults (§7.1.1) and
  ``options.evaluations_semantic`` (§7.1.2: ``execute_all``, ``deny_on_first_deny``,
  ``permit_on_first_permit``; the short-circuited answer ends with the deciding evaluation);
- ``GET /.well-known/authzen-configuration`` (§9): the PDP metadata; for an issuer with a path
  (``https://host/tp``) also at ``/.well-known/authzen-configuration/tp``, the location §9.2 forms
  by inserting the well-known string between host and path (the one a PEP fetches).

Not served: the Search APIs (§8): ``/access/v1/search/{subject,resource,action}`` answer 404
``not_found`` and the metadata names no ``search_*_endpoint`` (§9.1.1: their absence tells the PEP).
Another method than POST on an evaluation endpoint is a 405 ``invalid_request`` with ``Allow: POST``.

Callers authenticate with a bearer access token this server issued for the audience
``{issuer}/access/v1`` with scope ``decision:evaluate``, checked by the one bearer guard
(``trustplane.bearer_guard``: revocation, client, mandate and scope on every call; RFC 6750 errors). A deny
is a 200 with ``"decision": false`` (§10.1.2); 400 is for bodies that are not the information model,
with a JSON error naming the field. ``X-Request-ID`` is echoed (§10.1.3) and becomes the decisions'
correlation id, unless an evaluation names its own in trustplane's extension member
``correlation_id`` (a PEP batching several callers' questions does). Decisions are recorded by the
decision point; these handlers only translate.

Thin Starlette handlers mounted as fast routes (no FastAPI middleware): the body is read once,
parsed with orjson, and the answer written directly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from trustplane.authzen.model import Decision, DecisionPoint, DecisionRequest
from trustplane.authzen.wire import (
    MAX_CORRELATION_ID,
    decision_to_json,
    evaluations_from_json,
    repeats_a_member_name,
    request_from_json,
)
from trustplane.bearer_guard import BearerGuard, Protected
from trustplane.bearer_guard.http import answered, caller
from trustplane.errors import ErrorTable, InvalidRequestError, NotFoundError

SCOPE = "decision:evaluate"
WELL_KNOWN = "/.well-known/authzen-configuration"
#: §8's endpoints (their default paths, §10.1): not served.
SEARCH_PATHS = tuple(f"/access/v1/search/{kind}" for kind in ("subject", "resource", "action"))
#: Methods answered 405 at the evaluation endpoints (HEAD comes with GET).
_NOT_POST = ["GET", "PUT", "PATCH", "DELETE"]
MAX_BODY = 256 * 1024
MAX_REQUEST_ID = MAX_CORRELATION_ID
AUTHZEN_DECISIONS = Counter(
    "trustplane_authzen_decisions_total", "AuthZEN decisions answered", ["endpoint", "decision"]
)
#: The counter's children, looked up once (``labels`` takes a lock and builds a key per call).
_COUNTED = {
    (endpoint, allowed): AUTHZEN_DECISIONS.labels(endpoint, "allow" if allowed else "deny")
    for endpoint in ("evaluation", "evaluations")
    for allowed in (True, False)
}


Handler = Callable[[Request], Awaitable["Response | Decided"]]


@dataclass(frozen=True, slots=True)
class AuthzenHttp:
    pdp: DecisionPoint
    guard: BearerGuard
    route: Protected = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route", self.guard.route("authzen", "/access/v1", SCOPE))

    @property
    def issuer(self) -> str:
        return self.guard.issuer

    @property
    def audience(self) -> str:
        return self.route.audience

    def metadata(self) -> dict[str, Any]:
        """§9.1: endpoint parameters only; search endpoints are absent because not served."""
        return {
            "policy_decision_point": self.issuer,
            "access_evaluation_endpoint": f"{self.audience}/evaluation",
            "access_evaluations_endpoint": f"{self.audience}/evaluations",
        }

    async def evaluation(self, request: Request) -> Decided:
        await caller(self.guard, request, self.route)
        body = await _json_body(request)
        request_id = request.headers.get("x-request-id")
        decision = await self._decide(request_from_json(body, "", _correlation(request_id)))
        _count("evaluation", [decision])
        return Decided(decision_to_json(decision), request_id)

    async def evaluations(self, request: Request) -> Decided:
        await caller(self.guard, request, self.route)
        body = await _json_body(request)
        request_id = request.headers.get("x-request-id")
        batch = evaluations_from_json(body, _correlation(request_id))
        if batch is None:  # §7.1: no evaluations array, the single-evaluation behaviour
            decision = await self._decide(request_from_json(body, "", _correlation(request_id)))
            _count("evaluations", [decision])
            return Decided(decision_to_json(decision), request_id)
        decisions = await self._batch(*batch)
        _count("evaluations", decisions)
        return Decided({"evaluations": [decision_to_json(d) for d in decisions]}, request_id)

    async def _decide(self, one: DecisionRequest) -> Decision:
        return await self.pdp.decide(
            one.subject,
            one.action,
            one.resource,
            one.context,
            correlation_id=one.correlation_id,
            transaction_id=one.transaction_id,
        )

    async def _batch(self, requests: Sequence[DecisionRequest], semantic: str) -> list[Decision]:
        if semantic == "execute_all":
            return await self.pdp.decide_many(requests)
        stop_when = semantic == "permit_on_first_permit"
        decisions: list[Decision] = []
        for one in requests:
            decisions.append(await self._decide(one))
            if decisions[-1].allowed is stop_when:
                break
        return decisions

    async def configuration(self, _request: Request) -> Response:
        return Response(orjson.dumps(self.metadata()), media_type="application/json")

    def well_known_paths(self) -> list[str]:
        """§9.2: the well-known string inserted between the issuer's host and its path; and the
        path-less form (the same for an issuer without a path; for one with a path, where a
        deployment mounted under that path by a proxy is asked)."""
        inserted = WELL_KNOWN + urlsplit(self.issuer).path
        return sorted({WELL_KNOWN, inserted})

    def routes(self) -> list[Route]:
        refused = [
            Route(path, _endpoint("authzen_refused", _not_post), methods=_NOT_POST)
            for path in ("/access/v1/evaluation", "/access/v1/evaluations")
        ]
        unserved = [
            Route(path, _endpoint("authzen_refused", _not_served), methods=["POST", *_NOT_POST])
            for path in SEARCH_PATHS
        ]
        metadata = [
            Route(path, self.configuration, methods=["GET"]) for path in self.well_known_paths()
        ]
        return [
            Route(
                "/access/v1/evaluation",
                _endpoint("authzen_evaluation", self.evaluation),
                methods=["POST"],
            ),
            Route(
                "/access/v1/evaluations",
                _endpoint("authzen_evaluations", self.evaluations),
                methods=["POST"],
            ),
            *refused,
            *unserved,
            *metadata,
        ]


class MethodNotAllowedError(InvalidRequestError):
    """RFC 9110 §15.5.6: the evaluation endpoints take POST only (§10.1); ``Allow`` says so."""

    status_code = 405


async def _not_post(request: Request) -> Response:
    raise MethodNotAllowedError(
        f"{request.method} is not allowed here: use POST", headers={"Allow": "POST"}
    )


async def _not_served(_request: Request) -> Response:
    raise NotFoundError(
        "the AuthZEN Search APIs are not served (the PDP metadata names no search endpoint)"
    )


class Decided:
    """The 200 answer, sent as two raw ASGI messages (the success path needs none of Starlette's
    header machinery): JSON, ``Cache-Control: no-store``, ``X-Request-ID`` echoed (§10.1.3)."""

    __slots__ = ("body", "request_id")

    def __init__(self, body: dict[str, Any], request_id: str | None) -> None:
        self.body = orjson.dumps(body)
        self.request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"cache-control", b"no-store"),
            (b"content-length", str(len(self.body)).encode()),
        ]
        if self.request_id is not None:  # Starlette's headers are latin-1 both ways
            headers.append((b"x-request-id", self.request_id.encode("latin-1")))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def _endpoint(name: str, fn: Handler) -> Handler:
    """The one error renderer, plus the ``X-Request-ID`` echo on every answer (§10.1.3): the
    handlers' own answers carry it, the error renderer's get it here."""
    inner = answered(ErrorTable(name))(fn)

    async def handler(request: Request) -> Response | Decided:
        response = await inner(request)
        if isinstance(response, Response):
            request_id = request.headers.get("x-request-id")
            if request_id is not None:
                response.headers["X-Request-ID"] = request_id
        return response

    return handler


def _correlation(request_id: str | None) -> str | None:
    return request_id[:MAX_REQUEST_ID] if request_id else None


def _count(endpoint: str, decisions: Sequence[Decision]) -> None:
    for decision in decisions:
        _COUNTED[endpoint, decision.allowed].inc()


async def _json_body(request: Request) -> dict[str, Any]:
    """§10.1: ``Content-Type: application/json`` and a JSON object, or a 400 saying what is wrong;
    an object naming a member twice is refused too (§11.5, I-JSON)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise InvalidRequestError("Content-Type must be application/json")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise InvalidRequestError(f"the request body is larger than {MAX_BODY} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    if repeats_a_member_name(raw, body):
        raise InvalidRequestError("the request body names a member twice in one object")
    return body


def authzen_paths() -> dict[str, Any]:
    """OpenAPI descriptions of the AuthZEN routes (fast routes, invisible to FastAPI), so that the
    schemathesis fuzz test drives them."""
    entity = {
        "type": "object",
        "required": ["type", "id"],
        "properties": {
            "type": {"type": "string"},
            "id": {"type": "string"},
            "properties": {"type": "object"},
        },
    }
    action = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "properties": {"type": "object"}},
    }
    single = {
        "type": "object",
        "required": ["subject", "action", "resource"],
        "properties": {
            "subject": entity,
            "action": action,
            "resource": entity,
            "context": {"type": "object"},
        },
    }
    batch = {
        "type": "object",
        "properties": {
            **single["properties"],  # type: ignore[dict-item]
            "evaluations": {"type": "array", "items": {"type": "object"}},
            "options": {
                "type": "object",
                "properties": {
                    "evaluations_semantic": {
                        "type": "string",
                        "enum": ["execute_all", "deny_on_first_deny", "permit_on_first_permit"],
                    }
                },
            },
        },
    }
    error = {"type": "object", "properties": {"error": {"type": "string"}}}

    def post(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": schema}},
                },
                "responses": {
                    "200": {
                        "description": "the decision(s)",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": {
                        "description": "not the information model",
                        "content": {"application/json": {"schema": error}},
                    },
                    "401": {
                        "description": "RFC 6750 invalid_token",
                        "content": {"application/json": {"schema": error}},
                    },
                    "403": {
                        "description": "RFC 6750 insufficient_scope",
                        "content": {"application/json": {"schema": error}},
                    },
                },
            }
        }

    return {
        "/access/v1/evaluation": post("AuthZEN Access Evaluation (§6)", single),
        "/access/v1/evaluations": post("AuthZEN Access Evaluations (§7)", batch),
        "/.well-known/authzen-configuration": {
            "get": {
                "summary": "AuthZEN Policy Decision Point metadata (§9)",
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }
