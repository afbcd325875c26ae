"""Admin API of the PDP: ``POST {issuer}/access/v1/simulations`` replays recorded decisions against a
candidate bundle (the same as ``trustplane policy simulate``).

Callers present an access token for the PDP audience ``{issuer}/access/v1`` with scope
``policy:simulate``, checked by the one bearer guard before the body is read (RFC 6750: 401
``invalid_token`` for a missing, foreign, expired or revoked token, 403 ``insufficient_scope``
otherwise). The candidate is either a published version (``{"version": "..."}``) or bundle files
(``{"bundle": {"files": {"schema.cedarschema": ...}}}``), which are validated and tested first (422
``invalid_bundle`` with the problems if not). A body that is not the request model is 400
``invalid_request`` naming the field; errors are rendered from :data:`ERRORS`.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.responses import Response

from trustplane import errors
from trustplane.bearer_guard import BearerGuard
from trustplane.bearer_guard.http import NO_STORE, answered, caller
from trustplane.policy.bundle import BundleError, BundleSource, CompiledBundle, compile_bundle
from trustplane.policy.service import PolicyService, PublishRefused, check_bundle
from trustplane.policy.simulate import SimulationReport, simulate
from trustplane.policy.store import UnknownBundle
from trustplane.protocol.responses import json_response
from trustplane.settings import Settings

SCOPE = "policy:simulate"
MAX_FILES_BYTES = 2 << 20
#: The JSON body: the files plus JSON escaping and the other members.
MAX_BODY_BYTES = 3 * MAX_FILES_BYTES


class CandidateFiles(BaseModel):
    files: dict[str, str] = Field(max_length=200)


class SimulationRequest(BaseModel):
    version: str | None = Field(default=None, max_length=64)
    bundle: CandidateFiles | None = None
    since: int | None = Field(
        default=None, ge=0, le=10**11, description="Epoch seconds; default: all"
    )
    until: int | None = Field(
        default=None, ge=0, le=10**11, description="Epoch seconds; default: now"
    )
    max_flips: int | None = Field(default=None, ge=0)
    max_flip_rate: float | None = Field(default=None, ge=0, le=1)
    examples: int = Field(default=5, ge=0, le=100)


def _invalid_bundle(exc: PublishRefused | BundleError) -> errors.OAuth2Error:
    description = "the candidate bundle does not validate or its tests fail"
    return errors.InvalidBundleError(description, exc.problems)


ERRORS = errors.ErrorTable(
    "policy_simulations",
    {
        UnknownBundle: lambda exc: errors.UnknownBundleError(str(exc)),
        PublishRefused: _invalid_bundle,
        BundleError: _invalid_bundle,
        ValidationError: lambda exc: errors.InvalidRequestError(_first_problem(exc)),
    },
)


def simulation_router(policy: PolicyService, guard: BearerGuard, settings: Settings) -> APIRouter:
    route = guard.route("policy_simulations", "/access/v1", SCOPE)
    router = APIRouter(prefix="/access/v1", tags=["policy"])

    async def candidate(body: SimulationRequest) -> CompiledBundle:
        if (body.version is None) == (body.bundle is None):
            raise errors.InvalidRequestError("give exactly one of 'version' or 'bundle'")
        if body.version is not None:
            record = await policy.get(body.version)
            assert record.source is not None
            return compile_bundle(record.source)
        assert body.bundle is not None
        files = body.bundle.files
        if sum(len(v) for v in files.values()) > MAX_FILES_BYTES:
            raise errors.ContentTooLargeError("the bundle is too large")
        compiled, _ = check_bundle(BundleSource(files))
        return compiled

    @router.post(
        "/simulations",
        summary="Replay recorded decisions against a candidate bundle",
        openapi_extra=_body_doc(),
    )
    @answered(ERRORS)
    async def create_simulation(request: Request) -> Response:
        await caller(guard, request, route)
        body = await _request_body(request)
        compiled = await candidate(body)
        report: SimulationReport = await simulate(
            policy.db,
            compiled,
            since_ms=body.since * 1000 if body.since is not None else None,
            until_ms=body.until * 1000 if body.until is not None else None,
            limit=settings.policy_simulation_max_records,
            examples=body.examples,
        )
        result = report.to_dict()
        result["exceeded"] = report.exceeds(body.max_flips, body.max_flip_rate)
        return json_response(result, 200, NO_STORE)

    return router


async def _request_body(request: Request) -> SimulationRequest:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise errors.InvalidRequestError("Content-Type must be application/json")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise errors.ContentTooLargeError(f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return SimulationRequest.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError:
        raise errors.InvalidRequestError("the request body is not valid JSON") from None


def _first_problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc']) or 'body'}: {first['msg']}"


def _body_doc() -> dict[str, Any]:
    """The request model in the OpenAPI document, its ``$defs`` inlined (the body is read by hand,
    after the bearer check, so FastAPI does not describe it)."""
    schema = SimulationRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}
