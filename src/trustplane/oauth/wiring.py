"""The OAuth core's component: the protocol endpoints (token, introspection, revocation, JWKS,
RFC 8414 metadata) on the hot path.

The token endpoint, the client authenticator and the introspection service are built by the
composition root (they take parts of several components) and handed to :class:`Endpoints`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from trustplane.component import Idle, Routes
from trustplane.keys.service import KeyService
from trustplane.oauth.discovery import server_metadata
from trustplane.oauth.introspection import IntrospectionService
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.protocol.scopes import Vocabulary
from trustplane.settings import Settings
from trustplane.tls import CertificateSource


@dataclass
class Endpoints(Idle):
    """The protocol endpoints, served outside FastAPI (``trustplane.app.TrustplaneApp``)."""

    token_endpoint: TokenEndpoint
    introspection: IntrospectionService
    keys: KeyService
    metadata_json: Callable[[], bytes]
    #: RFC 8705 client certificates (connection or trusted proxy); None when mTLS is off
    certificates: CertificateSource | None = None
    #: RFC 8705 §5 token endpoint alias at ``mtls_base_url`` (a DPoP proof's ``htu`` there)
    mtls_token_url: str | None = None
    name = "oauth"

    def routes(self) -> Routes:
        from trustplane.oauth.http import OAuthHttp

        http = OAuthHttp(
            self.token_endpoint,
            self.introspection,
            self.keys,
            self.metadata_json,
            self.certificates,
            mtls_token_url=self.mtls_token_url,
        )
        return Routes(fast=http.routes())


def metadata_json(
    settings: Settings, vocabulary: Vocabulary, verifier_key: Callable[[], str | None]
) -> Callable[[], bytes]:
    """RFC 8414 metadata, serialized once the audit log's key is known (``verifier_key``: it is
    created on the first start, so until then each answer is built without it)."""
    built: list[bytes] = []

    def metadata() -> bytes:
        if not built:
            key = verifier_key()
            body = orjson.dumps(server_metadata(settings, vocabulary, key))
            if key is None:
                return body
            built.append(body)
        return built[0]

    return metadata
