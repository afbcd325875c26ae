"""Test partners: a key pair, a trust profile document, and assertions minted with PyJWT."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import EXECUTION, LEI, jwks_for, new_ec_key, sign_jwt

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
PARTNER_LEI = "529900T8BM49AURSDO55"  # a valid LEI (check digits 55)


@dataclass
class Partner:
    """One federated partner: ``partner_id``, its issuer and its ES256 signing key."""

    partner_id: str
    issuer: str
    audience: str  # our issuer: the assertion's aud
    key: ec.EllipticCurvePrivateKey = field(default_factory=new_ec_key)
    kid: str = "p1"

    def profile(self, **overrides: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "partner_id": self.partner_id,
            "name": f"partner {self.partner_id}",
            "lei": PARTNER_LEI,
            "issuers": [self.issuer],
            "keys": {"jwks": jwks_for(self.key, self.kid)},
            "algorithms": ["ES256"],
            "max_assertion_lifetime": 300,
            "required_claims": ["desk"],
            "claim_mappings": {"desk": "desk", "product_class": "product"},
            "allowed_scopes": ["order:create", "order:cancel"],
            "allowed_audiences": [EXECUTION],
            "allowed_products": ["bond"],
            "accepted_token_types": [TOKEN_TYPE_JWT],
            # not the default (sender_constrained): tests that are not about binding send no proof;
            # test_partner_binding.py removes it (token_binding=None) or sets another value
            "token_binding": "bearer",
        }
        doc.update(overrides)
        return {k: v for k, v in doc.items() if v is not None}

    def assertion(self, **overrides: Any) -> str:
        """A fresh assertion; ``None`` removes a claim; ``_headers``/``_key``/``_alg`` adjust signing."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "trader-42",
            "aud": self.audience,
            "iat": now,
            "exp": now + 120,
            "jti": uuid.uuid4().hex,
            "desk": "rates-emea",
        }
        return sign_jwt(claims, self.key, self.kid, overrides)


def client_metadata(**overrides: Any) -> dict[str, Any]:
    """Registration metadata of a client allowed to use the jwt-bearer grant."""
    meta: dict[str, Any] = {
        "lei": LEI,
        "grant_types": ["client_credentials", JWT_BEARER],
        "scope": "order:create order:cancel settlement:submit",
    }
    meta.update(overrides)
    return meta
