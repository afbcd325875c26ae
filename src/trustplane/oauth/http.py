"""Thin Starlette handlers for the protocol hot paths: read the body once, call the framework-free
service, return a ``Response`` directly (no request models, no JSON encoder detours)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from trustplane.errors import OAuth2Error
from trustplane.keys.service import KeyService
from trustplane.oauth.introspection import IntrospectionService
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.protocol.form import read_form
from trustplane.protocol.responses import NO_STORE, Answer, NoStoreJSON, protocol_endpoint


@dataclass(frozen=True, slots=True)
class OAuthHttp:
    token_endpoint: TokenEndpoint
    introspection: IntrospectionService
    keys: KeyService
    metadata_json: Callable[[], bytes]

    async def token(self, request: Request) -> Answer:
        try:
            form = await read_form(request)
        except OAuth2Error as exc:
            await self.token_endpoint.refuse_unparsed(exc)
            raise
        body = await self.token_endpoint.handle(form, request.headers.get("authorization"))
        return NoStoreJSON(body)

    async def introspect(self, request: Request) -> Answer:
        form = await read_form(request)
        body = await self.introspection.introspect(form, request.headers.get("authorization"))
        return NoStoreJSON(body)

    async def revoke(self, request: Request) -> Response:
        form = await read_form(request)
        await self.introspection.revoke(form, request.headers.get("authorization"))
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
