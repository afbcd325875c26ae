"""The partner admin API (FastAPI, so it is in the OpenAPI document) and the published schema.

Every route but the schema needs a bearer access token issued by this server for the audience
``{issuer}/federation`` with scope ``partner:administer``, checked by the one bearer guard (RFC 6750
§3: 401 ``invalid_token`` / 403 ``insufficient_scope``, with ``WWW-Authenticate``); errors are
rendered from :data:`ERRORS`. Bodies are trust profile documents, JSON or
YAML (``application/yaml``); an invalid one is 400 ``invalid_trust_profile`` listing every problem.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from trustplane import errors
from trustplane.bearer_guard import BearerGuard
from trustplane.bearer_guard.http import NO_STORE, answered, caller
from trustplane.federation.profile import MAX_DOCUMENT_BYTES, ProfileError, parse_document, schema
from trustplane.federation.service import (
    FederationService,
    PartnerExistsError,
    PartnerNotFoundError,
    VersionConflictError,
)
from trustplane.federation.store import StoredProfile
from trustplane.limits import UnstorableText
from trustplane.protocol.responses import json_response

ADMIN_PATH = "/federation"
ADMIN_SCOPE = "partner:administer"
DOCUMENT_TYPES = ("application/json", "application/yaml", "application/x-yaml", "text/yaml")
ERRORS = errors.ErrorTable(
    "federation",
    {
        ProfileError: lambda exc: errors.InvalidTrustProfileError(str(exc)[:1000], exc.errors[:50]),
        PartnerNotFoundError: lambda exc: errors.NotFoundError(f"no partner {str(exc)[:64]!r}"),
        PartnerExistsError: lambda exc: errors.PartnerExistsError(str(exc)),
        VersionConflictError: lambda exc: errors.ConflictError(str(exc)),
    },
)


def _body_doc() -> dict[str, Any]:
    """The request body in the OpenAPI document: the trust profile schema inlined (OpenAPI 3.1
    schemas are JSON Schema 2020-12), without the keywords that make it a standalone document."""
    inline = {k: v for k, v in schema().items() if k not in ("$schema", "$id")}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline},
                "application/yaml": {"schema": {"type": "string"}},
            },
        }
    }


def stored_body(stored: StoredProfile) -> dict[str, Any]:
    return {
        "partner_id": stored.partner_id,
        "version": stored.version,
        "status": stored.status,
        "created_at": stored.created_at,
        "changed_by": stored.changed_by,
        "profile": stored.document,
    }


async def _document(request: Request) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in DOCUMENT_TYPES:
        raise ProfileError([f"the body must be one of {', '.join(DOCUMENT_TYPES)}"])
    try:
        raw = await request.body()
    except UnstorableText as exc:  # the document's own refusal code, as for any bad document
        raise ProfileError([exc.description]) from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ProfileError([f"the document is larger than {MAX_DOCUMENT_BYTES} bytes"])
    if kind == "application/json":
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProfileError(["the body is not valid JSON"]) from None
    return parse_document(raw)


def federation_router(service: FederationService, guard: BearerGuard) -> APIRouter:
    router = APIRouter(prefix=ADMIN_PATH, tags=["federation"])
    body_doc = _body_doc()
    admin = guard.route("federation", ADMIN_PATH, ADMIN_SCOPE)
    schema_json = orjson.dumps(schema())

    @router.get("/trust-profile.schema.json", summary="The trust profile JSON Schema")
    async def profile_schema() -> Response:
        return Response(schema_json, media_type="application/schema+json")

    @router.get("/partners", summary="List partners (current versions)")
    @answered(ERRORS)
    async def list_partners(request: Request) -> Response:
        await caller(guard, request, admin)
        body = [stored_body(p) for p in await service.current()]
        return json_response({"partners": body}, 200, NO_STORE)

    @router.post("/partners", status_code=201, openapi_extra=body_doc, summary="Add a partner")
    @answered(ERRORS)
    async def add_partner(request: Request) -> Response:
        claims = await caller(guard, request, admin)
        stored = await service.add(await _document(request), changed_by=claims["client_id"])
        return json_response(stored_body(stored), 201, NO_STORE)

    @router.get("/partners/{partner_id}", summary="Show a partner's current profile")
    @answered(ERRORS)
    async def show_partner(partner_id: str, request: Request) -> Response:
        await caller(guard, request, admin)
        return json_response(stored_body(await service.get(partner_id)), 200, NO_STORE)

    @router.get("/partners/{partner_id}/versions", summary="Every version of a partner's profile")
    @answered(ERRORS)
    async def partner_versions(partner_id: str, request: Request) -> Response:
        await caller(guard, request, admin)
        versions = [stored_body(v) for v in await service.history(partner_id)]
        return json_response({"versions": versions}, 200, NO_STORE)

    @router.put(
        "/partners/{partner_id}", openapi_extra=body_doc, summary="Store a new profile version"
    )
    @answered(ERRORS)
    async def update_partner(partner_id: str, request: Request) -> Response:
        claims = await caller(guard, request, admin)
        document = await _document(request)
        stored = await service.update(partner_id, document, changed_by=claims["client_id"])
        return json_response(stored_body(stored), 200, NO_STORE)

    @router.post("/partners/{partner_id}/disable", summary="Disable a partner")
    @answered(ERRORS)
    async def disable_partner(partner_id: str, request: Request) -> Response:
        claims = await caller(guard, request, admin)
        reason = request.query_params.get("reason", "")
        stored = await service.disable(partner_id, changed_by=claims["client_id"], reason=reason)
        return json_response(stored_body(stored), 200, NO_STORE)

    return router


__all__ = ["ADMIN_SCOPE", "federation_router"]
