"""Thin Starlette handlers for the protocol hot paths: read the body once, call the framework-free
service, return a ``Response`` directly (no request models, no JSON encoder detours)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from trustplane.errors import InvalidRequestError, NotFoundError, OAuth2Error, wire_description
from trustplane.keys.service import KeyService
from trustplane.oauth.introspection import IntrospectionService
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.protocol.form import read_form
from trustplane.protocol.responses import (
    NO_STORE,
    Answer,
    NoStoreJSON,
    error_response,
    protocol_endpoint,
)
from trustplane.tls import CertificateSource, client_certificate


@contextlib.contextmanager
def wire_descriptions() -> Iterator[None]:
    """Every typed error raised inside leaves with a :func:`wire_description` (the audit record,
    written before, keeps ``debug``)."""
    try:
        yield
    except OAuth2Error as exc:
        exc.description = wire_description(exc.description)
        raise


@dataclass(frozen=True, slots=True)
class OAuthHttp:
    token_endpoint: TokenEndpoint
    introspection: IntrospectionService
    keys: KeyService
    metadata_json: Callable[[], bytes]
    #: Where client certificates come from (RFC 8705); None: mutual TLS is not configured.
    certificates: CertificateSource | None = None
    #: The RFC 8705 §5 alias of the token endpoint, when it is on a host of its own.
    mtls_token_url: str | None = None

    @property
    def mtls_host(self) -> str:
        return urlsplit(self.mtls_token_url).netloc if self.mtls_token_url else ""

    def _certificate(self, request: Request) -> x509.Certificate | None:
        if self.certificates is None:
            return None
        return client_certificate(request.scope, self.certificates)

    async def token(self, request: Request) -> Answer:
        with wire_descriptions():
            return NoStoreJSON(await self._token(request))

    async def _token(self, request: Request) -> dict[str, object]:
        try:
            form = await read_form(request)
        except OAuth2Error as exc:
            await self.token_endpoint.refuse_unparsed(exc)
            raise
        return await self.token_endpoint.handle(
            form,
            request.headers.get("authorization"),
            self._certificate(request),
            dpop_proofs=request.headers.getlist("dpop"),
            url=self._token_url(request),
        )

    def _token_url(self, request: Request) -> str | None:
        """The public URL of the token endpoint this request was sent to, for a DPoP proof's
        ``htu`` (RFC 9449 §4.3): the RFC 8705 §5 alias when the request came in at
        ``mtls_base_url``'s host, otherwise the issuer's (None)."""
        if self.mtls_token_url is None:
            return None
        host = request.headers.get("host", "")
        return self.mtls_token_url if host and host == self.mtls_host else None

    async def introspect(self, request: Request) -> Answer:
        with wire_descriptions():  # RFC 7662 §2.3 and RFC 7009 §2.2.1 answer as RFC 6749 §5.2
            form = await read_form(request)
            body = await self.introspection.introspect(
                form, request.headers.get("authorization"), self._certificate(request)
            )
            return NoStoreJSON(body)

    async def revoke(self, request: Request) -> Response:
        with wire_descriptions():
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


class MethodNotAllowedError(InvalidRequestError):
    """RFC 9110 §15.5.6: the route takes other methods; ``Allow`` names them. 405."""

    status_code = 405


async def routing_error(request: Request, exc: Exception) -> Response:
    """The router's own refusals in the server's RFC 6749 §5.2 shape (FastAPI's default is
    ``{"detail": ...}``): a path that is no route is 404 ``not_found`` (as the admin APIs answer a
    missing object), a method the route does not take is 405 ``invalid_request`` with ``Allow``
    (as the AuthZEN endpoints answer one)."""
    assert isinstance(exc, HTTPException)
    error: OAuth2Error
    if exc.status_code == 404:
        error = NotFoundError("no such endpoint")
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error = MethodNotAllowedError(
            f"{request.method} is not allowed here: use {allow}", headers={"Allow": allow}
        )
    elif exc.status_code == 400:
        error = InvalidRequestError(str(exc.detail))
    else:  # no route raises another: FastAPI's own answer
        return await http_exception_handler(request, exc)
    return error_response(error, "routing")
