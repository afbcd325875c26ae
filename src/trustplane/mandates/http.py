"""The mandate management API (FastAPI router under ``/mandates``).

Callers present a bearer access token issued by this server for the audience ``{issuer}/mandates``:
``mandate:view`` to read, ``mandate:administer`` to change. Bodies are read raw and validated here,
so a bad body gets a 400 ``invalid_request`` (or ``invalid_authorization_details``), never a
framework 422; state conflicts are 409, unknown mandates 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from trustplane.clients.http import bearer_token
from trustplane.errors import (
    InsufficientScopeError,
    InvalidRequestError,
    InvalidTokenError,
    OAuth2Error,
)
from trustplane.mandates.errors import (
    MandateConflictError,
    MandateError,
    MandateInvalidError,
    MandateNotFoundError,
    MandateStateError,
)
from trustplane.mandates.model import LegalBasis, MandateFilter, MandateStatus, MandateTerms
from trustplane.oauth.http import NO_STORE, error_response, json_response
from trustplane.oauth.scopes import internal_audience

MAX_BODY = 64 * 1024
VIEW, ADMINISTER = "mandate:view", "mandate:administer"
_MANDATE_ERRORS: dict[type[MandateError], tuple[int, str]] = {
    MandateNotFoundError: (404, "not_found"),
    MandateConflictError: (409, "conflict"),
    MandateStateError: (409, "invalid_state"),
    MandateInvalidError: (400, "invalid_request"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateIn(_Strict):
    grantor_lei: str = Field(min_length=20, max_length=20)
    grantor_person: str | None = Field(default=None, min_length=1, max_length=128)
    grantee_client_id: str = Field(min_length=1, max_length=128)
    scopes: list[str] = Field(min_length=1, max_length=32)
    authorization_details: list[dict[str, Any]] = Field(default_factory=list, max_length=16)
    effective_from: int | None = Field(default=None, ge=0)
    effective_until: int | None = Field(default=None, ge=0)
    legal_basis: Literal[
        "mandate", "standing_instruction", "onboarding_agreement", "tri_party_rule"
    ] = "mandate"
    document_ref: str | None = Field(default=None, min_length=1, max_length=500)
    accepted_by: str | None = Field(default=None, min_length=1, max_length=128)


class AmendIn(_Strict):
    scopes: list[str] | None = Field(default=None, min_length=1, max_length=32)
    authorization_details: list[dict[str, Any]] | None = Field(default=None, max_length=16)
    effective_from: int | None = Field(default=None, ge=0)
    effective_until: int | None = Field(default=None, ge=0)
    legal_basis: (
        Literal["mandate", "standing_instruction", "onboarding_agreement", "tri_party_rule"] | None
    ) = None
    document_ref: str | None = Field(default=None, min_length=1, max_length=500)
    expected_version: int | None = Field(default=None, ge=1)
    accepted_by: str | None = Field(default=None, min_length=1, max_length=128)
    reason: str | None = Field(default=None, max_length=500)


class ReasonIn(_Strict):
    reason: str | None = Field(default=None, max_length=500)


class AcceptIn(_Strict):
    accepted_by: str = Field(min_length=1, max_length=128)


async def _body(request: Request, model: type[_Strict]) -> Any:
    raw = await request.body()
    if not raw and model is ReasonIn:
        return ReasonIn()
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise InvalidRequestError("the body must be application/json")
    if len(raw) > MAX_BODY:
        raise InvalidRequestError("the body is too large")
    try:
        return model.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError:
        raise InvalidRequestError("the body is not valid JSON") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequestError(f"{field}: {first['msg']}") from None


def _integer(query: dict[str, str], name: str, low: int, high: int) -> int | None:
    if name not in query:
        return None
    value = query[name]
    if not value.isdigit() or not low <= int(value) <= high:
        raise InvalidRequestError(f"{name} must be an integer from {low} to {high}")
    return int(value)


def _filter(query: dict[str, str]) -> MandateFilter:
    unknown = set(query) - {"grantor", "grantee", "status", "expiring_within_days", "limit"}
    if unknown:
        raise InvalidRequestError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    status = query.get("status")
    if status is not None and status not in MandateStatus.__members__.values():
        raise InvalidRequestError(f"status must be one of {', '.join(MandateStatus)}")
    days = _integer(query, "expiring_within_days", 0, 3660)
    return MandateFilter(
        grantor_lei=query.get("grantor"),
        grantee_client_id=query.get("grantee"),
        status=MandateStatus(status) if status is not None else None,
        expiring_within=days * 86400 if days is not None else None,
        limit=_integer(query, "limit", 1, 1000) or 200,
    )


def mandates_router(svc: Any) -> APIRouter:
    router = APIRouter(prefix="/mandates", tags=["mandates"])
    audience = internal_audience(svc.settings.issuer, "/mandates")
    mandates = svc.mandates

    async def caller(request: Request, scope: str) -> str:
        claims = await svc.introspection.live_claims(bearer_token(request))
        if claims is None or claims.get("aud") != audience:
            raise InvalidTokenError(
                f"an active access token for {audience} is required",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if scope not in str(claims.get("scope", "")).split():
            raise InsufficientScopeError(
                f"scope {scope} is required",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        return f"client:{claims['client_id']}"

    async def answer(fn: Any, status: int = 200) -> Response:
        try:
            return json_response(await fn(), status, NO_STORE)
        except OAuth2Error as exc:
            return error_response(exc, "mandates")
        except MandateError as exc:
            code, error = _MANDATE_ERRORS.get(type(exc), (400, "invalid_request"))
            return json_response({"error": error, "error_description": str(exc)}, code, NO_STORE)

    @router.get("")
    async def list_mandates(request: Request) -> Response:
        """Query: grantor, grantee, status, expiring_within_days, limit (default 200)."""

        async def run() -> Any:
            await caller(request, VIEW)
            flt = _filter(dict(request.query_params))
            return {"mandates": [m.to_dict() for m in await mandates.list(flt)]}

        return await answer(run)

    @router.post("", status_code=201)
    async def create(request: Request) -> Response:
        async def run() -> Any:
            actor = await caller(request, ADMINISTER)
            body: CreateIn = await _body(request, CreateIn)
            terms = MandateTerms(
                grantor_lei=body.grantor_lei,
                grantee_client_id=body.grantee_client_id,
                scopes=tuple(body.scopes),
                authorization_details=tuple(body.authorization_details),
                effective_from=body.effective_from,
                effective_until=body.effective_until,
                legal_basis=LegalBasis(body.legal_basis),
                document_ref=body.document_ref,
                grantor_person=body.grantor_person,
            )
            created = await mandates.create(terms, actor=actor, accepted_by=body.accepted_by)
            return created.to_dict()

        return await answer(run, 201)

    @router.get("/{mandate_id}")
    async def show(request: Request, mandate_id: str, version: int | None = None) -> Response:
        async def run() -> Any:
            await caller(request, VIEW)
            return (await mandates.get(mandate_id, version)).to_dict()

        return await answer(run)

    @router.get("/{mandate_id}/history")
    async def history(request: Request, mandate_id: str) -> Response:
        async def run() -> Any:
            await caller(request, VIEW)
            found = await mandates.history(mandate_id)
            return {
                "versions": [m.to_dict() for m in found.versions],
                "changes": [c.to_dict() for c in found.changes],
            }

        return await answer(run)

    @router.post("/{mandate_id}/accept")
    async def accept(request: Request, mandate_id: str) -> Response:
        async def run() -> Any:
            actor = await caller(request, ADMINISTER)
            body: AcceptIn = await _body(request, AcceptIn)
            return (
                await mandates.accept(mandate_id, accepted_by=body.accepted_by, actor=actor)
            ).to_dict()

        return await answer(run)

    @router.post("/{mandate_id}/amend")
    async def amend(request: Request, mandate_id: str) -> Response:
        async def run() -> Any:
            actor = await caller(request, ADMINISTER)
            body: AmendIn = await _body(request, AmendIn)
            meta = {"expected_version", "accepted_by", "reason"}
            changes = body.model_dump(exclude_unset=True, exclude=meta)
            if not changes:
                raise InvalidRequestError("nothing to amend")
            amended = await mandates.amend(
                mandate_id,
                actor=actor,
                changes=changes,
                expected_version=body.expected_version,
                accepted_by=body.accepted_by,
                reason=body.reason,
            )
            return amended.to_dict()

        return await answer(run)

    for action in ("suspend", "resume", "revoke"):
        router.add_api_route(
            f"/{{mandate_id}}/{action}", _transition(action, caller, answer, mandates),
            methods=["POST"], name=f"{action}_mandate",
        )  # fmt: skip
    return router


def _transition(
    action: str, caller: Any, answer: Callable[..., Awaitable[Response]], mandates: Any
) -> Any:
    async def endpoint(request: Request, mandate_id: str) -> Response:
        async def run() -> Any:
            actor = await caller(request, ADMINISTER)
            body: ReasonIn = await _body(request, ReasonIn)
            method = getattr(mandates, action)
            return (await method(mandate_id, actor=actor, reason=body.reason)).to_dict()

        return await answer(run)

    endpoint.__doc__ = f"{action.capitalize()} a mandate."
    return endpoint
