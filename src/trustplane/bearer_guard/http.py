"""The Starlette/FastAPI side of the guard, and the one error renderer of the guarded APIs.

- :func:`caller` / :func:`authenticated`: read the request's ``Authorization`` header (and whether a
  token hides in the query string) and ask the framework-free :class:`BearerGuard`.
- :func:`render_error`: the one way a guarded API turns an exception into a response. Typed wire
  errors answer as themselves (``{"error", "error_description", ...}``, their status, their headers,
  ``Cache-Control: no-store``); a component exception answers as its router's
  :class:`~trustplane.errors.ErrorTable` says; a failed dependency is 503
  ``temporarily_unavailable``; anything else is a bug: logged with its traceback, 500 ``server_error``.
- :func:`answered`: wraps an endpoint so that every exception goes through :func:`render_error`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response

from trustplane import metrics
from trustplane.bearer_guard.guard import BearerGuard, BearerRequest, Protected
from trustplane.errors import ErrorTable, ServerError, TemporarilyUnavailableError
from trustplane.keys.service import NoActiveKeyError
from trustplane.protocol.tokens import VerifiedClaims
from trustplane.storage.writer import WriterUnavailable
from trustplane.tls import CertificateSource, client_certificate

log = structlog.get_logger("trustplane.bearer_guard")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
#: What fails closed with a 503: the database writer, the key ring, the network or the disk.
DEPENDENCY_FAILURES = (WriterUnavailable, NoActiveKeyError, ConnectionError, OSError)
R = TypeVar("R")


def bearer_request(
    request: Request, certificates: CertificateSource | None = None
) -> BearerRequest:
    """The ``Authorization`` fields in one pass over the raw header list (ASGI field names are
    lower-case), read as Starlette's ``headers.get`` and ``getlist`` would: the first value, decoded
    as Latin-1, and how many there are. Starlette's ``getlist`` decoded every field of the request.
    The client certificate (``certificates``: the TLS connection's, or a trusted proxy's header) is
    read only if the guard asks, for a certificate-bound token."""
    value: bytes | None = None
    count = 0
    for name, field in request.scope["headers"]:
        if name == b"authorization":
            count += 1
            if value is None:
                value = field
    query: bytes = request.scope.get("query_string", b"")  # parsed only when it may hold a token
    token_in_query = b"access_token" in query and "access_token" in request.query_params
    authorization = None if value is None else value.decode("latin-1")
    if certificates is None:
        return BearerRequest(authorization, count, token_in_query)
    source = certificates
    return BearerRequest(
        authorization, count, token_in_query, lambda: client_certificate(request.scope, source)
    )


async def caller(guard: BearerGuard, request: Request, route: Protected) -> VerifiedClaims:
    """The claims of the request's bearer token, checked for ``route`` (scopes included)."""
    return await guard.check(bearer_request(request, guard.certificates), route)


async def authenticated(guard: BearerGuard, request: Request, route: Protected) -> VerifiedClaims:
    """Every check but the scopes (for an API that records who was refused a scope)."""
    return await guard.authenticate(bearer_request(request, guard.certificates), route)


def render_error(exc: Exception, table: ErrorTable) -> Response:
    wire = table.to_wire(exc)
    if wire is None and isinstance(exc, DEPENDENCY_FAILURES):
        log.error("dependency_unavailable", endpoint=table.endpoint, error=repr(exc))
        wire = TemporarilyUnavailableError("try again shortly")
    elif wire is None:
        log.error("unhandled_error", endpoint=table.endpoint, exc_info=exc)
        wire = ServerError("internal error")
    metrics.PROTOCOL_ERRORS.labels(endpoint=table.endpoint, error=wire.error).inc()
    return Response(
        orjson.dumps(wire.body()),
        wire.status_code,
        headers={**NO_STORE, **wire.headers},
        media_type="application/json",
    )


def answered(
    table: ErrorTable,
) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R | Response]]]:
    """Decorate an endpoint: whatever it raises is answered by :func:`render_error`. The wrapper keeps
    the endpoint's signature, so FastAPI still sees its parameters."""

    def wrap(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R | Response]]:
        @functools.wraps(fn)
        async def endpoint(*args: Any, **kwargs: Any) -> R | Response:
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                return render_error(exc, table)

        return endpoint

    return wrap
