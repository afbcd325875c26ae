"""Dynamic client registration (RFC 7591) and management (RFC 7592), as a FastAPI router so that the
endpoints appear in the OpenAPI document. Bodies are read raw and validated by the service, so every
bad body gets ``invalid_client_metadata`` / ``invalid_redirect_uri`` instead of a framework 422.

The bearer token (initial access token, RFC 7591 §3; registration access token, RFC 7592 §2) is
checked before the body is read: an unauthenticated caller is answered 401 without a byte of its body
being read (the response then closes the connection, :mod:`trustplane.limits`). The body is read with
a cap of ``MAX_BODY`` (413 ``invalid_request`` past it).

Read and update answers carry the registration access token the caller presented (RFC 7592 §3:
REQUIRED in every client information response; the server keeps only its hash, and does not rotate
it) and ``client_secret_expires_at`` for a client with a secret (RFC 7591 §3.2.1), never the
secret itself (stored hashed, shown once)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from trustplane import metrics
from trustplane.clients.metadata import ClientMetadataIn
from trustplane.clients.service import ClientService, Registration
from trustplane.errors import InvalidClientMetadataError, InvalidTokenError, OAuth2Error
from trustplane.limits import UnstorableText, read_body
from trustplane.protocol.responses import NO_STORE, error_response, json_response

MAX_BODY = 64 * 1024
_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ClientMetadataIn.model_json_schema()}},
    }
}


def bearer_token(request: Request) -> str:
    """RFC 6750 §2.1 only: tokens in the query string or the body are not accepted."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise InvalidTokenError(
            "a bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="trustplane"'}
        )
    return value.strip()


async def json_body(request: Request) -> Any:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise InvalidClientMetadataError("the body must be application/json")
    try:
        raw = await read_body(request, MAX_BODY)
    except UnstorableText as exc:  # RFC 7591 §3.2.2: a metadata value is invalid
        raise InvalidClientMetadataError(exc.description) from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidClientMetadataError("the body is not valid JSON") from None


def registration_router(service: ClientService, issuer: str) -> APIRouter:
    router = APIRouter(tags=["registration"])

    def response_body(reg: Registration) -> dict[str, Any]:
        body = reg.client.public_metadata()
        body["registration_client_uri"] = f"{issuer}/register/{reg.client.client_id}"
        if reg.client_secret:
            body["client_secret"] = reg.client_secret
        if reg.client.secret_hash:  # RFC 7591 §3.2.1: REQUIRED whenever a secret was issued
            body["client_secret_expires_at"] = 0
        if reg.registration_access_token:
            body["registration_access_token"] = reg.registration_access_token
        return body

    def failed(exc: OAuth2Error, endpoint: str) -> Response:
        if isinstance(exc, InvalidTokenError) and "WWW-Authenticate" not in exc.headers:
            exc.headers["WWW-Authenticate"] = 'Bearer realm="trustplane", error="invalid_token"'
        metrics.REGISTRATIONS.labels(outcome=exc.error).inc()
        return error_response(exc, endpoint)

    @router.post(
        "/register",
        status_code=201,
        openapi_extra=_BODY_DOC,
        summary="Register a client (RFC 7591)",
    )
    async def register(request: Request) -> Response:
        try:
            token = bearer_token(request)
            await service.check_initial_access_token(token)  # before a byte of the body is read
            reg = await service.register(await json_body(request), initial_access_token=token)
        except OAuth2Error as exc:
            return failed(exc, "registration")
        metrics.REGISTRATIONS.labels(outcome="registered").inc()
        return json_response(response_body(reg), 201, NO_STORE)

    @router.get("/register/{client_id}", summary="Read a client's registration (RFC 7592)")
    async def read(client_id: str, request: Request) -> Response:
        try:
            token = bearer_token(request)
            client = await service.authorize_management(client_id, token)
        except OAuth2Error as exc:
            return failed(exc, "registration")
        return json_response(response_body(Registration(client, None, token)), 200, NO_STORE)

    @router.put(
        "/register/{client_id}",
        openapi_extra=_BODY_DOC,
        summary="Replace a client's metadata (RFC 7592)",
    )
    async def update(client_id: str, request: Request) -> Response:
        try:
            token = bearer_token(request)
            client = await service.authorize_management(client_id, token, change=True)
            updated = await service.update(client, await json_body(request))
        except OAuth2Error as exc:
            return failed(exc, "registration")
        return json_response(response_body(Registration(updated, None, token)), 200, NO_STORE)

    @router.delete(
        "/register/{client_id}", status_code=204, summary="Deregister a client (RFC 7592)"
    )
    async def deregister(client_id: str, request: Request) -> Response:
        try:
            client = await service.authorize_management(
                client_id, bearer_token(request), change=True
            )
            await service.deregister(client)
        except OAuth2Error as exc:
            return failed(exc, "registration")
        return Response(status_code=204, headers=NO_STORE)

    return router
