"""Thin Starlette handlers for the protocol hot paths: read the body once, call the framework-free
service, return a ``Response`` directly (no request models, no JSON encoder detours)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import structlog
from cryptography import x509
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from trustplane import metrics
from trustplane.dependencies import database_failure, unavailable
from trustplane.errors import OAuth2Error, ServerError
from trustplane.keys.service import KeyService, NoActiveKeyError
from trustplane.oauth.form import read_form
from trustplane.oauth.introspection import IntrospectionService
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.storage.writer import WriterUnavailable
from trustplane.tls import CertificateSource, client_certificate

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


@dataclass(frozen=True, slots=True)
class OAuthHttp:
    token_endpoint: TokenEndpoint
    introspection: IntrospectionService
    keys: KeyService
    metadata_json: Callable[[], bytes]
    #: Where client certificates come from (RFC 8705); None: mutual TLS is not configured.
    certificates: CertificateSource | None = None

    def _certificate(self, request: Request) -> x509.Certificate | None:
        if self.certificates is None:
            return None
        return client_certificate(request.scope, self.certificates)

    async def token(self, request: Request) -> Answer:
        try:
            form = await read_form(request)
        except OAuth2Error as exc:
            await self.token_endpoint.refuse_unparsed(exc)
            raise
        body = await self.token_endpoint.handle(
            form, request.headers.get("authorization"), self._certificate(request)
        )
        return NoStoreJSON(body)

    async def introspect(self, request: Request) -> Answer:
        form = await read_form(request)
        body = await self.introspection.introspect(
            form, request.headers.get("authorization"), self._certificate(request)
        )
        return NoStoreJSON(body)

    async def revoke(self, request: Request) -> Response:
        form = await read_form(request)
        await self.introspection.revoke(
            form, request.headers.get("authorization"), self._certificate(request)
        )
        return Response(b"", 200, headers=NO_STORE)

    async def jwks(self, _request: Request) -> Response:
        return Response(
            self.keys.ring.jwks_json,
            headers={"Cache-Control": "public, max-age=300"},
            media_type="application/jwk-set+json",
        )

    async def server_metadata(self, _request: Request) -> Response:
        return Response(self.metadata_json(), media_type="application/json")

    def routes(self) -> list[Route]:
        return [
            Route("/token", protocol_endpoint("token", self.token), methods=["POST"]),
            Route(
                "/introspect", protocol_endpoint("introspection", self.introspect), methods=["POST"]
            ),
            Route("/revoke", protocol_endpoint("revocation", self.revoke), methods=["POST"]),
            Route("/jwks", self.jwks, methods=["GET"]),
            Route("/.well-known/oauth-authorization-server", self.server_metadata, methods=["GET"]),
        ]
