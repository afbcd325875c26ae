"""DPoP proofs built independently of trustplane's JOSE code: PyJWT signs them, its own algorithm
classes export the public JWKs, and the RFC 7638 thumbprint is computed here by hand."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

URL = "https://as.example/token"
#: RFC 7638 §3.2: the required members of each key type, in lexicographic order.
THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def rfc7638(jwk: dict[str, Any]) -> str:
    members = {name: jwk[name] for name in THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64url(hashlib.sha256(canonical).digest())


def ath_of(token: str) -> str:
    return b64url(hashlib.sha256(token.encode()).digest())


@dataclass
class ProofKey:
    """A client's DPoP key pair; ``proof`` signs a proof with PyJWT."""

    alg: str
    private: Any
    jwk: dict[str, Any]

    @classmethod
    def generate(cls, alg: str = "ES256") -> ProofKey:
        if alg == "ES256":
            key: Any = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        elif alg == "EdDSA":
            key = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        return cls(alg, key, dict(jwk))

    @property
    def jkt(self) -> str:
        return rfc7638(self.jwk)

    def claims(self, htm: str = "POST", htu: str = URL, **overrides: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "jti": uuid.uuid4().hex,
            "htm": htm,
            "htu": htu,
            "iat": int(time.time()),
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def proof(
        self,
        *,
        headers: dict[str, Any] | None = None,
        drop_headers: tuple[str, ...] = (),
        key: Any = None,
        alg: str | None = None,
        **claims: Any,
    ) -> str:
        header: dict[str, Any] = {"typ": "dpop+jwt", "jwk": self.jwk, **(headers or {})}
        for name in drop_headers:
            header.pop(name, None)
        payload = json.dumps(self.claims(**claims)).encode()  # raw: PyJWT adds nothing
        signed = jwt.api_jws.encode(
            payload, key or self.private, algorithm=alg or self.alg, headers=header
        )
        if "typ" in drop_headers:  # PyJWT writes typ JWT when none is given: strip it by hand
            head, body, _signature = signed.split(".")
            decoded = json.loads(base64.urlsafe_b64decode(head + "=="))
            decoded.pop("typ", None)
            return self._resign(decoded, body, key, alg)
        return signed

    def _resign(self, header: dict[str, Any], body: str, key: Any, alg: str | None) -> str:
        signing_input = f"{b64url(json.dumps(header).encode())}.{body}"
        algorithm = jwt.get_algorithm_by_name(alg or self.alg)
        signature = algorithm.sign(signing_input.encode(), key or self.private)
        return f"{signing_input}.{b64url(signature)}"


def hs256_proof(proof_key: ProofKey, secret: bytes, **claims: Any) -> str:
    """A MAC "proof": HS256 keyed by a secret, the public jwk in the header. Built by hand."""
    header = {"alg": "HS256", "typ": "dpop+jwt", "jwk": proof_key.jwk}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(proof_key.claims(**claims)).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"
