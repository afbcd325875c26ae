"""The SSF endpoints (FastAPI: they are in the OpenAPI document; none is a hot path).

- ``GET /.well-known/ssf-configuration``: the transmitter's metadata (SSF 1.0 §7), public.
- ``/ssf/stream`` (POST create, GET read, PATCH update, PUT replace, DELETE), ``/ssf/status`` (GET,
  POST), ``/ssf/verify`` (POST) and ``/ssf/poll/{stream_id}`` (RFC 8936): behind the one bearer
  guard, audience ``{issuer}/ssf``, scope ``ssf:stream``; a client sees only its own streams.
  Errors are rendered from :data:`ERRORS` (``{"error", "error_description"}``); a refused poll
  request also carries RFC 8936 §2.4.4's ``{"err", "description"}``.
- ``POST /ssf/receiver``: our push receiver (RFC 8935). The SET's signature by a trusted partner is
  its authentication; the answer is 202, or 400 with RFC 8935 §2.3's ``{"err", "description"}``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from trustplane import errors
from trustplane.bearer_guard import BearerGuard
from trustplane.bearer_guard.http import NO_STORE, answered, caller
from trustplane.protocol.responses import json_response
from trustplane.ssf.receiver import Receiver, SetRefused
from trustplane.ssf.transmitter import (
    StreamConflictError,
    StreamError,
    StreamNotFoundError,
    Transmitter,
    configuration_url,
)

API_PATH = "/ssf"
SCOPE = "ssf:stream"
MAX_SET_BYTES = 64 * 1024
ERRORS = errors.ErrorTable(
    "ssf",
    {
        StreamError: lambda exc: errors.InvalidRequestError(str(exc)[:500]),
        StreamConflictError: lambda exc: errors.ConflictError(str(exc)[:500]),
        StreamNotFoundError: lambda exc: errors.NotFoundError("no such stream"),
    },
)


async def _json(request: Request) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise StreamError("the body must be application/json")
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise StreamError("the body is not valid JSON") from None


def ssf_router(transmitter: Transmitter, receiver: Receiver, guard: BearerGuard) -> APIRouter:
    router = APIRouter(tags=["shared signals"])
    route = guard.route("ssf", API_PATH, SCOPE)
    configuration = orjson.dumps(transmitter.configuration())

    async def ssf_configuration() -> Response:
        return Response(configuration, media_type="application/json")

    # SSF 1.0 §7.2: between the issuer's host and its path; also at the root of the app (the same
    # URL for an issuer without a path; a deployment mounted under its issuer's path serves it
    # there)
    well_known = urlsplit(configuration_url(transmitter.issuer)).path
    for path in sorted({"/.well-known/ssf-configuration", well_known}):
        router.add_api_route(
            path, ssf_configuration, methods=["GET"], summary="SSF transmitter configuration"
        )

    @router.post("/ssf/stream", status_code=201, summary="Create a stream (SSF 1.0 §8.1.1.1)")
    @answered(ERRORS)
    async def create_stream(request: Request) -> Response:
        claims = await caller(guard, request, route)
        config = await transmitter.create(claims["client_id"], await _json(request))
        return json_response(config, 201, NO_STORE)

    @router.get("/ssf/stream", summary="Read one stream, or all of the caller's")
    @answered(ERRORS)
    async def read_stream(request: Request) -> Response:
        claims = await caller(guard, request, route)
        stream_id = request.query_params.get("stream_id")
        found = await transmitter.read(claims["client_id"], stream_id)
        return json_response(found[0] if stream_id is not None else found, 200, NO_STORE)

    @router.patch("/ssf/stream", summary="Update a stream's receiver-supplied members")
    @answered(ERRORS)
    async def update_stream(request: Request) -> Response:
        claims = await caller(guard, request, route)
        body = await _json(request)
        config = await transmitter.update(claims["client_id"], body, replace=False)
        return json_response(config, 200, NO_STORE)

    @router.put("/ssf/stream", summary="Replace a stream's receiver-supplied members")
    @answered(ERRORS)
    async def replace_stream(request: Request) -> Response:
        claims = await caller(guard, request, route)
        body = await _json(request)
        config = await transmitter.update(claims["client_id"], body, replace=True)
        return json_response(config, 200, NO_STORE)

    @router.delete("/ssf/stream", status_code=204, summary="Delete a stream")
    @answered(ERRORS)
    async def delete_stream(request: Request) -> Response:
        claims = await caller(guard, request, route)
        await transmitter.delete(claims["client_id"], request.query_params.get("stream_id"))
        return Response(status_code=204, headers=NO_STORE)

    @router.get("/ssf/status", summary="A stream's status")
    @answered(ERRORS)
    async def stream_status(request: Request) -> Response:
        claims = await caller(guard, request, route)
        body = await transmitter.status(claims["client_id"], request.query_params.get("stream_id"))
        return json_response(body, 200, NO_STORE)

    @router.post("/ssf/status", summary="Enable, pause or disable a stream")
    @answered(ERRORS)
    async def set_status(request: Request) -> Response:
        claims = await caller(guard, request, route)
        body = await transmitter.set_status(claims["client_id"], await _json(request))
        return json_response(body, 200, NO_STORE)

    @router.post("/ssf/verify", status_code=204, summary="Ask for a verification event")
    @answered(ERRORS)
    async def verify(request: Request) -> Response:
        claims = await caller(guard, request, route)
        await transmitter.verify(claims["client_id"], await _json(request))
        return Response(status_code=204, headers=NO_STORE)

    @router.post("/ssf/poll/{stream_id}", summary="Poll for SETs (RFC 8936)")
    @answered(ERRORS)
    async def poll(stream_id: str, request: Request) -> Response:
        claims = await caller(guard, request, route)
        try:
            body = await transmitter.poll(claims["client_id"], stream_id, await _json(request))
        except StreamError as exc:
            # RFC 8936 §2.4.4: the poll error names its code in ``err`` (RFC 8935 §2.3's members);
            # ``error`` as on every other endpoint of this API
            wire = ERRORS.to_wire(exc) or errors.InvalidRequestError(str(exc)[:500])
            answer = {**wire.body(), "err": wire.error, "description": wire.description}
            return json_response(answer, wire.status_code, NO_STORE)
        return json_response(body, 200, NO_STORE)

    @router.post("/ssf/receiver", status_code=202, summary="Push receiver (RFC 8935)")
    async def receive(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await request.body()
        try:
            if kind != "application/secevent+jwt":
                raise SetRefused("invalid_request", "the body must be application/secevent+jwt")
            if len(raw) > MAX_SET_BYTES:
                raise SetRefused("invalid_request", "the SET is too large")
            try:
                token = raw.decode("ascii").strip()
            except UnicodeDecodeError:
                raise SetRefused("invalid_request", "the SET is not a compact JWS") from None
            await receiver.receive(token)
        except SetRefused as exc:
            body = {"err": exc.err, "description": exc.description[:500]}
            return json_response(body, 400, NO_STORE)
        return Response(status_code=202, headers=NO_STORE)

    return router
