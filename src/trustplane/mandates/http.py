"""The mandate management API (FastAPI router under ``/mandates``).

Callers present a bearer access token issued by this server for the audience ``{issuer}/mandates``:
``mandate:view`` to read, ``mandate:administer`` to change, checked by the one bearer guard (which
also refuses a token resting on a mandate that is no longer usable). Bodies are read raw and
validated here, so a bad body gets a 400 ``invalid_request`` (or ``invalid_authorization_details``),
never a framework 422; state conflicts are 409, unknown mandates 404 (:data:`ERRORS`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from trustplane import errors
from trustplane.bearer_guard import BearerGuard
from trustplane.bearer_guard.http import NO_STORE, answered, caller
from trustplane.errors import InvalidRequestError
from trustplane.mandates.errors import (
    MandateConflictError,
    MandateError,
    MandateNotFoundError,
    MandateStateError,
)
from trustplane.mandates.model import LegalBasis, MandateFilter, MandateStatus, MandateTerms
from trustplane.mandates.service import MandateService
from trustplane.protocol.responses import json_response

MAX_BODY = 64 * 1024
VIEW, ADMINISTER = "mandate:view", "mandate:administer"
#: MandateInvalidError and any other MandateError: 400 invalid_request (the nearest class wins).
ERRORS = errors.ErrorTable(
    "mandates",
    {
        MandateNotFoundError: lambda exc: errors.NotFoundError(str(exc)),
        MandateConflictError: lambda exc: errors.ConflictError(str(exc)),
        MandateStateError: lambda exc: errors.InvalidStateError(str(exc)),
        MandateError: lambda exc: errors.InvalidRequestError(str(exc)),
    },
)
Actor = Callable[[Request, str], Awaitable[str]]
Endpoint = Callable[..., Awaitable[Response]]


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


def mandates_router(mandates: MandateService, guard: BearerGuard) -> APIRouter:
    router = APIRouter(prefix="/mandates", tags=["mandates"])
    routes = {scope: guard.route("mandates", "/mandates", scope) for scope in (VIEW, ADMINISTER)}

    async def actor(request: Request, scope: str) -> str:
        claims = await caller(guard, request, routes[scope])
        return f"client:{claims['client_id']}"

    @router.get("")
    @answered(ERRORS)
    async def list_mandates(request: Request) -> Response:
        """Query: grantor, grantee, status, expiring_within_days, limit (default 200)."""
        await actor(request, VIEW)
        flt = _filter(dict(request.query_params))
        return _ok({"mandates": [m.to_dict() for m in await mandates.list(flt)]})

    @router.post("", status_code=201)
    @answered(ERRORS)
    async def create(request: Request) -> Response:
        who = await actor(request, ADMINISTER)
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
        created = await mandates.create(terms, actor=who, accepted_by=body.accepted_by)
        return _ok(created.to_dict(), 201)

    @router.get("/{mandate_id}")
    @answered(ERRORS)
    async def show(request: Request, mandate_id: str, version: int | None = None) -> Response:
        await actor(request, VIEW)
        return _ok((await mandates.get(mandate_id, version)).to_dict())

    @router.get("/{mandate_id}/history")
    @answered(ERRORS)
    async def history(request: Request, mandate_id: str) -> Response:
        await actor(request, VIEW)
        found = await mandates.history(mandate_id)
        return _ok(
            {
                "versions": [m.to_dict() for m in found.versions],
                "changes": [c.to_dict() for c in found.changes],
            }
        )

    @router.post("/{mandate_id}/accept")
    @answered(ERRORS)
    async def accept(request: Request, mandate_id: str) -> Response:
        who = await actor(request, ADMINISTER)
        body: AcceptIn = await _body(request, AcceptIn)
        accepted = await mandates.accept(mandate_id, accepted_by=body.accepted_by, actor=who)
        return _ok(accepted.to_dict())

    @router.post("/{mandate_id}/amend")
    @answered(ERRORS)
    async def amend(request: Request, mandate_id: str) -> Response:
        who = await actor(request, ADMINISTER)
        body: AmendIn = await _body(request, AmendIn)
        meta = {"expected_version", "accepted_by", "reason"}
        changes = body.model_dump(exclude_unset=True, exclude=meta)
        if not changes:
            raise InvalidRequestError("nothing to amend")
        amended = await mandates.amend(
            mandate_id,
            actor=who,
            changes=changes,
            expected_version=body.expected_version,
            accepted_by=body.accepted_by,
            reason=body.reason,
        )
        return _ok(amended.to_dict())

    for action in ("suspend", "resume", "revoke"):
        router.add_api_route(
            f"/{{mandate_id}}/{action}", _transition(action, actor, mandates),
            methods=["POST"], name=f"{action}_mandate",
        )  # fmt: skip
    return router


def _ok(body: Any, status: int = 200) -> Response:
    return json_response(body, status, NO_STORE)


def _transition(action: str, actor: Actor, mandates: MandateService) -> Endpoint:
    @answered(ERRORS)
    async def endpoint(request: Request, mandate_id: str) -> Response:
        who = await actor(request, ADMINISTER)
        body: ReasonIn = await _body(request, ReasonIn)
        method = getattr(mandates, action)
        return _ok((await method(mandate_id, actor=who, reason=body.reason)).to_dict())

    endpoint.__doc__ = f"{action.capitalize()} a mandate."
    return endpoint
