"""An issuer for PEP tests: a key pair, a JWKS and RFC 8414 metadata served through httpx's mock
transport (the validator's real HTTP code runs; only the network is replaced), and PyJWT to mint
tokens, hostile ones included, independently of trustplane's own JOSE code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete

from tests.conftest import PROTOCOL_DATABASES
from trustplane.keys.crypto import public_jwk
from trustplane.outbound import OutboundFetcher
from trustplane.pep.idempotency_store import SqlIdempotencyStore, idempotency_keys
from trustplane.storage.db import Database

ISSUER = "https://as.example"
AUDIENCE = "https://execution.example/api"
LEI = "5493001KJTIIGC8Y1R12"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class FakeIssuer:
    """Serves ``/.well-known/oauth-authorization-server`` and ``/jwks``; counts the requests."""

    issuer: str = ISSUER
    keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    metadata_issuer: str | None = None
    metadata_jwks_uri: str | None = None
    down: bool = False

    def __post_init__(self) -> None:
        self.add_key("k1")

    def add_key(self, kid: str) -> ec.EllipticCurvePrivateKey:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        return self.keys[kid]

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {**public_jwk(k), "kid": kid, "alg": "ES256", "use": "sig"}
                for kid, k in self.keys.items()
            ]
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if self.down:
            raise httpx.ConnectError("issuer down")
        if request.url.path == "/.well-known/oauth-authorization-server":
            issuer = self.metadata_issuer or self.issuer
            jwks_uri = self.metadata_jwks_uri or f"{self.issuer}/jwks"
            return httpx.Response(200, json={"issuer": issuer, "jwks_uri": jwks_uri})
        if request.url.path == "/jwks":
            return httpx.Response(200, json=self.jwks())
        return httpx.Response(404)

    def fetcher(self) -> OutboundFetcher:
        """The guarded fetcher the PEP uses in production, over the mock transport."""
        return OutboundFetcher(transport=httpx.MockTransport(self.handler))

    def public_pem(self, kid: str = "k1") -> bytes:
        return (
            self.keys[kid]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "client-1",
            "aud": AUDIENCE,
            "exp": now + 300,
            "iat": now,
            "nbf": now,
            "jti": uuid.uuid4().hex,
            "client_id": "client-1",
            "scope": "order:create order:cancel",
            "lei": LEI,
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def token(
        self,
        *,
        kid: str = "k1",
        typ: str = "at+jwt",
        key: Any = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        header = {"kid": kid, "typ": typ, **(headers or {})}
        payload = json.dumps(self.claims(**claims)).encode()  # raw: PyJWT's claim checks skipped
        return jwt.api_jws.encode(payload, key or self.keys[kid], algorithm="ES256", headers=header)

    def unsigned_token(self, **claims: Any) -> str:
        """``alg: none`` (PyJWT writes an empty signature)."""
        return jwt.encode(
            self.claims(**claims), None, algorithm="none", headers={"typ": "at+jwt", "kid": "k1"}
        )

    def hs256_with_public_key(self, secret: bytes | None = None, **claims: Any) -> str:
        """The key-confusion attack: HS256 keyed with the issuer's public key. Built by hand, since
        PyJWT (rightly) refuses an asymmetric key as an HMAC secret."""
        header = {"alg": "HS256", "typ": "at+jwt", "kid": "k1"}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(self.claims(**claims)).encode())}"
        mac = hmac.new(secret or self.public_pem(), signing_input.encode(), hashlib.sha256)
        return f"{signing_input}.{b64url(mac.digest())}"


@pytest.fixture
def issuer() -> FakeIssuer:
    return FakeIssuer()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeClock:
    """An injectable clock (Unix seconds) that tests move by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=PROTOCOL_DATABASES)
async def idempotency_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SqlIdempotencyStore]:
    """The SQL idempotency store on a fresh SQLite file, or emptied in the session's PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'resource-server.db'}"
    else:
        url = request.getfixturevalue("pg_database")
    database = Database(url)
    store = SqlIdempotencyStore(database)
    await store.create_schema()
    async with database.transaction() as conn:
        await conn.execute(delete(idempotency_keys))
    yield store
    await database.dispose()
