"""The HTTP PDP: OpenID AuthZEN Authorization API 1.0 over the decision point.

- ``POST /access/v1/evaluation`` (§6): one decision;
- ``POST /access/v1/evaluations`` (§7): a batch, top-level defaults (§7.1.1) and
  ``options.evaluations_semantic`` (§7.1.2: ``execute_all``, ``deny_on_first_deny``,
  ``permit_on_first_permit``; the short-circuited answer ends with the deciding evaluation);
- ``GET /.well-known/authzen-configuration`` (§9): the PDP metadata.

Callers authenticate with a bearer access token this server issued for the audience
``{issuer}/access/v1`` with scope ``decision:evaluate`` (RFC 6750 errors, in the header only). A deny
is a 200 with ``"decision": false`` (§12.1.3); 400 is for bodies that are not the information model,
with a JSON error naming the field. ``X-Request-ID`` is echoed (§12.1.4) and becomes the decisions'
correlation id. Decisions are recorded by the decision point; these handlers only translate.

Thin Starlette handlers mounted as fast routes (no FastAPI middleware): the body is read once,
parsed with orjson, and the answer written directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from trustplane.clients.service import ClientRegistry
from trustplane.errors import (
    InsufficientScopeError,
    InvalidRequestError,
    InvalidTokenError,
    OAuth2Error,
)
from trustplane.keys.service import KeyService
from trustplane.oauth.http import Answer, Handler, json_response, protocol_endpoint
from trustplane.oauth.scopes import internal_audience
from trustplane.oauth.tokens import VerifiedClaims, read_access_token
from trustplane.pep.authzen import (
    decision_to_json,
    evaluations_from_json,
    request_from_json,
)
from trustplane.pep.bearer import QUERY_OR_FORM_TOKEN, bearer_token, with_challenge
from trustplane.policy.model import Decision, DecisionPoint, DecisionRequest

SCOPE = "decision:evaluate"
MAX_BODY = 256 * 1024
MAX_REQUEST_ID = 256
VERIFIED_CACHE_SIZE = 10_000
AUTHZEN_DECISIONS = Counter(
    "trustplane_authzen_decisions_total", "AuthZEN decisions answered", ["endpoint", "decision"]
)


@dataclass(frozen=True, slots=True)
class AuthzenHttp:
    pdp: DecisionPoint
    keys: KeyService
    registry: ClientRegistry
    issuer: str
    verified_tokens: dict[str, VerifiedClaims] = field(default_factory=dict)

    @property
    def audience(self) -> str:
        return internal_audience(self.issuer, "/access/v1")

    def metadata(self) -> dict[str, Any]:
        """§9.1: endpoint parameters only; search endpoints are absent because not served."""
        return {
            "policy_decision_point": self.issuer,
            "access_evaluation_endpoint": f"{self.audience}/evaluation",
            "access_evaluations_endpoint": f"{self.audience}/evaluations",
        }

    async def evaluation(self, request: Request) -> Answer:
        self._authenticate(request)
        body = await _json_body(request)
        decision = await self._decide(request_from_json(body, "", _request_id(request)))
        _count("evaluation", [decision])
        return _answer(decision_to_json(decision))

    async def evaluations(self, request: Request) -> Answer:
        self._authenticate(request)
        body = await _json_body(request)
        batch = evaluations_from_json(body, _request_id(request))
        if batch is None:  # §7.1: no evaluations array, the single-evaluation behaviour
            decision = await self._decide(request_from_json(body, "", _request_id(request)))
            _count("evaluations", [decision])
            return _answer(decision_to_json(decision))
        decisions = await self._batch(*batch)
        _count("evaluations", decisions)
        return _answer({"evaluations": [decision_to_json(d) for d in decisions]})

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

    def _authenticate(self, request: Request) -> VerifiedClaims:
        try:
            return self._caller(request)
        except OAuth2Error as exc:
            raise with_challenge(exc, self.audience, SCOPE) from None

    def _caller(self, request: Request) -> VerifiedClaims:
        if "access_token" in request.query_params:
            raise InvalidRequestError(QUERY_OR_FORM_TOKEN)
        headers = request.headers
        token = bearer_token(headers.get("authorization"), len(headers.getlist("authorization")))
        claims = self._verified(token)
        if claims.get("aud") != self.audience:
            raise InvalidTokenError(f"the access token is not meant for {self.audience}")
        client = self.registry.get(str(claims.get("client_id")))
        if client is None or not client.active:
            raise InvalidTokenError("the access token's client is not active")
        if SCOPE not in str(claims.get("scope", "")).split():
            raise InsufficientScopeError(f"the access token lacks scope {SCOPE}")
        return claims

    def _verified(self, token: str) -> VerifiedClaims:
        """Our own token, signature checked once per token string and remembered until it expires
        (a PEP reuses its token for its lifetime); audience, client and scope are checked per call."""
        claims = self.verified_tokens.get(token)
        if claims is None or claims["exp"] <= time.time():
            claims = read_access_token(self.keys.ring, token, issuer=self.issuer)
            if claims is None:
                self.verified_tokens.pop(token, None)
                raise InvalidTokenError("the access token is invalid or expired")
            if len(self.verified_tokens) >= VERIFIED_CACHE_SIZE:
                self.verified_tokens.pop(next(iter(self.verified_tokens)))
            self.verified_tokens[token] = claims
        return claims

    async def configuration(self, _request: Request) -> Response:
        return Response(orjson.dumps(self.metadata()), media_type="application/json")

    def routes(self) -> list[Route]:
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
            Route("/.well-known/authzen-configuration", self.configuration, methods=["GET"]),
        ]


def _endpoint(name: str, fn: Handler) -> Handler:
    """``protocol_endpoint`` error mapping, plus the ``X-Request-ID`` echo on every answer."""
    inner = protocol_endpoint(name, fn)

    async def handler(request: Request) -> Answer:
        response = await inner(request)
        request_id = request.headers.get("x-request-id")
        if request_id is not None and isinstance(response, Response):
            response.headers["X-Request-ID"] = request_id
        return response

    return handler


def _request_id(request: Request) -> str | None:
    value = request.headers.get("x-request-id")
    return value[:MAX_REQUEST_ID] if value else None


def _answer(body: dict[str, Any]) -> Response:
    return json_response(body, 200, {"Cache-Control": "no-store"})


def _count(endpoint: str, decisions: Sequence[Decision]) -> None:
    for decision in decisions:
        AUTHZEN_DECISIONS.labels(endpoint, "allow" if decision.allowed else "deny").inc()


async def _json_body(request: Request) -> dict[str, Any]:
    """§12.1: ``Content-Type: application/json`` and a JSON object, or a 400 saying what is wrong."""
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
