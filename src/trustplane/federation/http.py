"""The partner admin API (FastAPI, so it is in the OpenAPI document) and the published schema.

Every route but the schema needs a bearer access token issued by this server for the audience
``{issuer}/federation`` with scope ``partner:administer`` (RFC 6750 §3: 401 ``invalid_token`` /
403 ``insufficient_scope``, with ``WWW-Authenticate``). Bodies are trust profile documents, JSON or
YAML (``application/yaml``); an invalid one is 400 ``invalid_trust_profile`` listing every problem.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from trustplane.clients.http import bearer_token
from trustplane.clients.service import ClientRegistry
from trustplane.errors import InsufficientScopeError, InvalidTokenError, OAuth2Error
from trustplane.federation.profile import MAX_DOCUMENT_BYTES, ProfileError, parse_document, schema
from trustplane.federation.service import (
    FederationService,
    PartnerExistsError,
    PartnerNotFoundError,
    VersionConflictError,
)
from trustplane.federation.store import StoredProfile
from trustplane.keys.service import KeyService
from trustplane.oauth.http import NO_STORE, error_response, json_response
from trustplane.oauth.scopes import internal_audience
from trustplane.oauth.tokens import VerifiedClaims, read_access_token

ADMIN_PATH = "/federation"
ADMIN_SCOPE = "partner:administer"
DOCUMENT_TYPES = ("application/json", "application/yaml", "application/x-yaml", "text/yaml")


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


def _problem(status: int, error: str, description: str, **extra: Any) -> Response:
    return json_response({"error": error, "error_description": description, **extra}, status)


class AdminAuth:
    """Bearer tokens of our own issuer for the federation admin audience."""

    def __init__(
        self, keys: KeyService, clients: ClientRegistry, service: FederationService, issuer: str
    ) -> None:
        self._keys, self._clients, self._service = keys, clients, service
        self._issuer, self.audience = issuer, internal_audience(issuer, ADMIN_PATH)

    async def require(self, request: Request) -> VerifiedClaims:
        challenge = f'Bearer realm="trustplane", scope="{ADMIN_SCOPE}"'
        token = bearer_token(request)
        claims = read_access_token(self._keys.ring, token, issuer=self._issuer)
        client = self._clients.get(str(claims.get("client_id"))) if claims else None
        if (
            claims is None
            or claims.get("aud") != self.audience
            or client is None
            or not client.active
            or await self._service.is_revoked(str(claims.get("jti")))
        ):
            raise InvalidTokenError(
                "the access token is invalid, expired, revoked or for another audience",
                headers={"WWW-Authenticate": f'{challenge}, error="invalid_token"'},
            )
        if ADMIN_SCOPE not in str(claims.get("scope", "")).split():
            raise InsufficientScopeError(
                f"scope {ADMIN_SCOPE} is required",
                headers={"WWW-Authenticate": f'{challenge}, error="insufficient_scope"'},
            )
        return claims


async def _document(request: Request) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in DOCUMENT_TYPES:
        raise ProfileError([f"the body must be one of {', '.join(DOCUMENT_TYPES)}"])
    raw = await request.body()
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ProfileError([f"the document is larger than {MAX_DOCUMENT_BYTES} bytes"])
    if kind == "application/json":
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProfileError(["the body is not valid JSON"]) from None
    return parse_document(raw)


async def _guarded(call: Any) -> Response:
    """Run an admin action; map every expected failure to its status and error code."""
    try:
        return await call()  # type: ignore[no-any-return]
    except OAuth2Error as exc:
        return error_response(exc, "federation")
    except ProfileError as exc:
        return _problem(400, "invalid_trust_profile", str(exc)[:1000], errors=exc.errors[:50])
    except PartnerNotFoundError as exc:
        return _problem(404, "not_found", f"no partner {str(exc)[:64]!r}")
    except PartnerExistsError as exc:
        return _problem(409, "partner_exists", str(exc))
    except VersionConflictError as exc:
        return _problem(409, "conflict", str(exc))


def federation_router(
    service: FederationService, keys: KeyService, clients: ClientRegistry, issuer: str
) -> APIRouter:
    router = APIRouter(prefix=ADMIN_PATH, tags=["federation"])
    body_doc = _body_doc()
    auth = AdminAuth(keys, clients, service, issuer)
    schema_json = orjson.dumps(schema())

    @router.get("/trust-profile.schema.json", summary="The trust profile JSON Schema")
    async def profile_schema() -> Response:
        return Response(schema_json, media_type="application/schema+json")

    @router.get("/partners", summary="List partners (current versions)")
    async def list_partners(request: Request) -> Response:
        async def run() -> Response:
            await auth.require(request)
            body = [stored_body(p) for p in await service.current()]
            return json_response({"partners": body}, 200, NO_STORE)

        return await _guarded(run)

    @router.post("/partners", status_code=201, openapi_extra=body_doc, summary="Add a partner")
    async def add_partner(request: Request) -> Response:
        async def run() -> Response:
            claims = await auth.require(request)
            stored = await service.add(await _document(request), changed_by=claims["client_id"])
            return json_response(stored_body(stored), 201, NO_STORE)

        return await _guarded(run)

    @router.get("/partners/{partner_id}", summary="Show a partner's current profile")
    async def show_partner(partner_id: str, request: Request) -> Response:
        async def run() -> Response:
            await auth.require(request)
            return json_response(stored_body(await service.get(partner_id)), 200, NO_STORE)

        return await _guarded(run)

    @router.get("/partners/{partner_id}/versions", summary="Every version of a partner's profile")
    async def partner_versions(partner_id: str, request: Request) -> Response:
        async def run() -> Response:
            await auth.require(request)
            versions = [stored_body(v) for v in await service.history(partner_id)]
            return json_response({"versions": versions}, 200, NO_STORE)

        return await _guarded(run)

    @router.put(
        "/partners/{partner_id}", openapi_extra=body_doc, summary="Store a new profile version"
    )
    async def update_partner(partner_id: str, request: Request) -> Response:
        async def run() -> Response:
            claims = await auth.require(request)
            document = await _document(request)
            stored = await service.update(partner_id, document, changed_by=claims["client_id"])
            return json_response(stored_body(stored), 200, NO_STORE)

        return await _guarded(run)

    @router.post("/partners/{partner_id}/disable", summary="Disable a partner")
    async def disable_partner(partner_id: str, request: Request) -> Response:
        async def run() -> Response:
            claims = await auth.require(request)
            reason = request.query_params.get("reason", "")
            stored = await service.disable(
                partner_id, changed_by=claims["client_id"], reason=reason
            )
            return json_response(stored_body(stored), 200, NO_STORE)

        return await _guarded(run)

    return router


__all__ = ["ADMIN_SCOPE", "federation_router"]
