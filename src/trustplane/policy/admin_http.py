"""Admin API of the PDP: ``POST {issuer}/access/v1/simulations`` replays recorded decisions against a
candidate bundle (the same as ``trustplane policy simulate``).

Callers present an access token for the PDP audience ``{issuer}/access/v1`` with scope
``policy:simulate`` (RFC 6750: 401 ``invalid_token`` for a missing, foreign, expired or revoked token,
403 ``insufficient_scope`` otherwise). The candidate is either a published version
(``{"version": "..."}``) or bundle files (``{"bundle": {"files": {"schema.cedarschema": ...}}}``),
which are validated and tested first (422 ``invalid_bundle`` with the problems if not).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from trustplane.clients.service import ClientRegistry
from trustplane.keys.service import KeyService
from trustplane.oauth.revocations import SqlRevocationStore
from trustplane.oauth.scopes import internal_audience
from trustplane.oauth.tokens import VerifiedClaims, read_access_token
from trustplane.policy.bundle import BundleError, BundleSource, CompiledBundle, compile_bundle
from trustplane.policy.service import PolicyService, PublishRefused, check_bundle
from trustplane.policy.simulate import SimulationReport, simulate
from trustplane.policy.store import UnknownBundle
from trustplane.settings import Settings

SCOPE = "policy:simulate"
MAX_FILES_BYTES = 2 << 20


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


class _Refusal(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


def _bearer_error(status: int, error: str, description: str) -> _Refusal:
    challenge = f'Bearer error="{error}", error_description="{description}"'
    if error == "insufficient_scope":
        challenge += f', scope="{SCOPE}"'
    return _Refusal(
        status, {"error": error, "error_description": description}, {"WWW-Authenticate": challenge}
    )


def simulation_router(
    policy: PolicyService, keys: KeyService, registry: ClientRegistry, settings: Settings
) -> APIRouter:
    audience = internal_audience(settings.issuer, "/access/v1")
    revocations = SqlRevocationStore()
    router = APIRouter(prefix="/access/v1", tags=["policy"])

    async def caller(authorization: str | None) -> VerifiedClaims:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refusal(401, {}, {"WWW-Authenticate": 'Bearer realm="trustplane"'})
        claims = read_access_token(keys.ring, token.strip(), issuer=settings.issuer)
        client = registry.get(str(claims.get("client_id"))) if claims else None
        if claims is None or client is None or not client.active:
            raise _bearer_error(401, "invalid_token", "the access token is not valid")
        async with policy.db.read() as conn:
            if await revocations.is_revoked(conn, str(claims["jti"])):
                raise _bearer_error(401, "invalid_token", "the access token is not valid")
        if claims.get("aud") != audience:
            raise _bearer_error(401, "invalid_token", "the access token is not for this audience")
        if SCOPE not in str(claims.get("scope", "")).split():
            raise _bearer_error(403, "insufficient_scope", f"scope {SCOPE} is required")
        return claims

    async def candidate(body: SimulationRequest) -> CompiledBundle:
        if (body.version is None) == (body.bundle is None):
            raise _Refusal(400, _invalid("give exactly one of 'version' or 'bundle'"))
        if body.version is not None:
            try:
                record = await policy.get(body.version)
            except UnknownBundle as exc:
                raise _Refusal(
                    404, {"error": "unknown_bundle", "error_description": str(exc)}
                ) from None
            assert record.source is not None
            return compile_bundle(record.source)
        assert body.bundle is not None
        files = body.bundle.files
        if sum(len(v) for v in files.values()) > MAX_FILES_BYTES:
            raise _Refusal(413, _invalid("the bundle is too large"))
        try:
            compiled, _ = check_bundle(BundleSource(files))
        except PublishRefused as exc:
            raise _Refusal(422, _bundle_problems(exc.problems)) from None
        except BundleError as exc:
            raise _Refusal(422, _bundle_problems(exc.problems)) from None
        return compiled

    @router.post("/simulations", summary="Replay recorded decisions against a candidate bundle")
    async def create_simulation(
        body: SimulationRequest,
        authorization: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        try:
            await caller(authorization)
            compiled = await candidate(body)
        except _Refusal as refusal:
            return JSONResponse(refusal.body, refusal.status, refusal.headers)
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
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    return router


def _invalid(description: str) -> dict[str, Any]:
    return {"error": "invalid_request", "error_description": description}


def _bundle_problems(problems: list[str]) -> dict[str, Any]:
    return {
        "error": "invalid_bundle",
        "error_description": "the candidate bundle does not validate or its tests fail",
        "problems": problems,
    }
