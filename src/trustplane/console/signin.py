"""The console signs people in as a client of this server: the authorization code flow with PKCE
(S256) through the ordinary ``/authorize`` login and consent pages, and the code redeemed in process
through the real token endpoint service (``TokenEndpoint.handle``), not over HTTP to itself.

The console's client is registered by :meth:`ConsoleClient.ensure` at start (an operator
registration: only it may name the console's internal audience). It authenticates with
``private_key_jwt``; its P-256 key is derived from the key-encryption key (HKDF, its own label), so
every process of a deployment holds the same key and nothing new needs storing or configuring.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustplane.clients.model import Client
from trustplane.clients.service import ClientService
from trustplane.console.roles import Role, console_audience
from trustplane.jose.jwk import thumbprint
from trustplane.jose.jws import Signer, parse
from trustplane.keys.crypto import public_jwk
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.protocol.form import FORM_TYPE, Form
from trustplane.settings import Settings

CLIENT_NAME = "trustplane console"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class SignInError(Exception):
    """The sign-in cannot complete; the message is shown to the person."""


@dataclass(frozen=True, slots=True)
class SignedIn:
    user_id: str
    scope: str
    auth_time: int | None


def console_key(kek: bytes) -> ec.EllipticCurvePrivateKey:
    """The console client's key: a P-256 scalar from HKDF of the KEK (deterministic per deployment)."""
    seed = HKDF(
        algorithm=hashes.SHA256(), length=48, salt=None, info=b"trustplane console client key v1"
    ).derive(kek)
    scalar = int.from_bytes(seed, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class ConsoleClient:
    def __init__(
        self, settings: Settings, clients: ClientService, token: TokenEndpoint, kek: bytes
    ) -> None:
        self._settings, self._clients, self._token = settings, clients, token
        key = console_key(kek)
        jwk = public_jwk(key)
        self._kid = thumbprint(jwk)
        self._jwk = {**jwk, "kid": self._kid, "alg": "ES256", "use": "sig"}
        self._signer = Signer(key, "ES256", self._kid, "JWT")
        self.redirect_uri = settings.issuer.rstrip("/") + "/console/callback"
        self.client_id: str | None = None

    def _metadata(self) -> dict[str, Any]:
        return {
            "client_name": CLIENT_NAME,
            "lei": self._settings.console_lei,
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "ES256",
            "jwks": {"keys": [self._jwk]},
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "scope": " ".join(role.scope for role in Role),
            "allowed_resources": [console_audience(self._settings.issuer)],
            "redirect_uris": [self.redirect_uri],
        }

    def _ours(self, client: Client) -> bool:
        keys = client.metadata.get("jwks", {}).get("keys", [])
        return (
            client.metadata.get("client_name") == CLIENT_NAME
            and client.metadata.get("redirect_uris") == [self.redirect_uri]
            and any(k.get("kid") == self._kid for k in keys)
        )

    async def ensure(self) -> str:
        """Find the console's client (the oldest, if several processes raced) or register it (an
        operator registration, audited like the CLI's): at start, and again at a sign-in if the
        start did not get that far."""
        mine = sorted(
            (c for c in await self._clients.list() if self._ours(c)),
            key=lambda c: (c.created_at, c.client_id),
        )
        if mine:
            self.client_id = mine[0].client_id
        else:
            registration = await self._clients.register(
                self._metadata(), initial_access_token=None, issue_registration_token=False
            )
            self.client_id = registration.client.client_id
        return self.client_id

    async def authorize_url(self, state: str, challenge: str) -> str:
        # every sign-in looks again: processes that raced at first start converge on the oldest
        await self.ensure()
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "scope": " ".join(role.scope for role in Role),
                "resource": console_audience(self._settings.issuer),
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        return f"/authorize?{query}"

    def _assertion(self) -> str:
        now = int(time.time())
        assert self.client_id is not None
        return self._signer.sign(
            {
                "iss": self.client_id,
                "sub": self.client_id,
                "aud": self._settings.issuer,
                "iat": now,
                "exp": now + 60,
                "jti": uuid.uuid4().hex,
            }
        )

    async def redeem(self, code: str, verifier: str) -> SignedIn:
        """RFC 6749 §4.1.3 through the token endpoint service; raises its typed error (audited
        there) when the code is bad, used, expired or bound to another verifier."""
        # every sign-in looks again: processes that raced at first start converge on the oldest
        await self.ensure()
        body = urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": verifier,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self._assertion(),
            }
        )
        answer = await self._token.handle(Form.parse(body.encode(), FORM_TYPE), None)
        # the token comes from the function call above, not from the network: its claims are read,
        # not verified again
        claims = parse(answer["access_token"]).claims()
        sub = claims.get("sub")
        if not isinstance(sub, str):
            raise SignInError("The sign-in did not name a person.")
        auth_time = claims.get("auth_time")
        return SignedIn(
            sub, str(answer.get("scope", "")), auth_time if isinstance(auth_time, int) else None
        )
