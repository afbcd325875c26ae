"""How the PEP authenticates itself when it calls the authorization server (introspection, RFC 7662)
or gets a token for a remote PDP (client credentials, RFC 6749 §4.4).

``PrivateKeyJwt`` (RFC 7523 §2.2, the default of trustplane) signs a fresh, short-lived assertion per
call; ``ClientSecretBasic`` (RFC 6749 §2.3.1) exists for authorization servers whose profile allows
secrets.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

from trustplane.jose.jwk import PrivateKey
from trustplane.jose.jws import Signer

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class ClientAuth(Protocol):
    @property
    def client_id(self) -> str: ...

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        """Add the credentials to an outgoing form request."""


@dataclass(frozen=True)
class ClientSecretBasic:
    client_id: str
    client_secret: str = field(repr=False)

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        # RFC 6749 §2.3.1: both parts are form-urlencoded before the Basic encoding.
        pair = f"{quote(self.client_id, safe='')}:{quote(self.client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")


@dataclass(frozen=True)
class PrivateKeyJwt:
    """``audience`` is the authorization server's issuer identifier (what trustplane expects)."""

    client_id: str
    key: PrivateKey = field(repr=False)
    kid: str
    audience: str
    alg: str = "ES256"
    lifetime: int = 60

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> None:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience,
            "iat": now,
            "exp": now + self.lifetime,
            "jti": uuid.uuid4().hex,
        }
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = Signer(self.key, self.alg, self.kid, "JWT").sign(claims)
