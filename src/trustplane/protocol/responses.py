"""Responses of the protocol endpoints: JSON bodies, the one renderer of RFC 6749 §5.2 errors, and the
wrapper that turns a failed dependency into a fail-closed 503 (:func:`protocol_endpoint`).

Groundwork: imported by every component's HTTP module, so it depends on nothing above it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from trustplane import metrics
from trustplane.dependencies import database_failure, unavailable
from trustplane.errors import OAuth2Error, ServerError
from trustplane.keys.service import NoActiveKeyError
from trustplane.storage.writer import WriterUnavailable

log = structlog.get_logger("trustplane.oauth")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class NoStoreJSON:
    """A 200 ``application/json`` answer with ``Cache-Control: no-store``, sent as two raw ASGI
    messages: the success path of the hot endpoints does not need Starlette's header machinery."""

    __slots__ = ("body",)
    _HEADERS = (
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-store"),
        (b"pragma", b"no-cache"),
    )

    def __init__(self, body: object) -> None:
        self.body = orjson.dumps(body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [*self._HEADERS, (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


#: What a protocol handler returns: a Starlette ``Response`` or a raw :class:`NoStoreJSON`.
Answer = Response | NoStoreJSON


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def error_response(exc: OAuth2Error, endpoint: str) -> Response:
    """The one renderer of RFC 6749 §5.2 error bodies."""
    metrics.PROTOCOL_ERRORS.labels(endpoint=endpoint, error=exc.error).inc()
    return json_response(exc.body(), exc.status_code, {**NO_STORE, **exc.headers})


Handler = Callable[[Request], Awaitable[Answer]]


def dependency_of(exc: Exception) -> str | None:
    """The dependency whose failure ``exc`` is (a 503, not a bug), or None."""
    if isinstance(exc, WriterUnavailable) or database_failure(exc):
        return "database"
    if isinstance(exc, NoActiveKeyError):
        return "signing keys"
    if isinstance(exc, ConnectionError | OSError | TimeoutError):
        return "network"
    return None


def protocol_endpoint(endpoint: str, fn: Handler) -> Handler:
    """Map typed errors to their wire form, and dependency failures to a fail-closed 503 with
    ``Retry-After`` (logged once per incident, :mod:`trustplane.dependencies`)."""

    async def handler(request: Request) -> Answer:
        try:
            return await fn(request)
        except OAuth2Error as exc:
            return error_response(exc, endpoint)
        except Exception as exc:
            dependency = dependency_of(exc)
            if dependency is not None:
                return error_response(unavailable(dependency, exc, endpoint=endpoint), endpoint)
            # a bug: log it with the traceback, answer in the protocol's shape
            log.exception("unhandled_error", endpoint=endpoint)
            return error_response(ServerError("internal error"), endpoint)

    return handler
