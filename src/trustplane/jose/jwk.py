"""JSON Web Keys (RFC 7517): import of public keys, RFC 7638 thumbprints, private-member checks."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

#: RFC 7518 §6.2.2, §6.3.2, RFC 8037 §2: members that carry private key material.
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MIN_RSA_BITS = 2048
#: Which algorithm each key kind may be used with; nothing else is accepted for it.
ALGORITHMS_FOR = {("EC", "P-256"): "ES256", ("OKP", "Ed25519"): "EdDSA", ("RSA", None): "PS256"}


class JWKError(ValueError):
    """The JWK is unusable; the message says why, in terms safe to show to the key's owner."""


def has_private_members(jwk: dict[str, Any]) -> bool:
    return any(member in jwk for member in PRIVATE_MEMBERS)


def algorithm_for(jwk: dict[str, Any]) -> str:
    """The single signature algorithm this key may be used with (``alg`` must agree if present)."""
    kty = jwk.get("kty")
    crv = jwk.get("crv") if kty != "RSA" else None
    # A non-string "crv" (e.g. a JSON array) is unhashable: refuse it instead of raising TypeError.
    alg = ALGORITHMS_FOR.get((str(kty), crv)) if isinstance(crv, str | None) else None
    if alg is None:
        raise JWKError(f"unsupported key type {kty!r}{f' curve {crv!r}' if crv else ''}")
    if "alg" in jwk and jwk["alg"] != alg:
        raise JWKError(f"key alg {jwk['alg']!r} is not allowed for a {kty} key (use {alg})")
    return alg


def import_public_jwk(jwk: dict[str, Any]) -> tuple[str, PublicKey]:
    """Validate one public JWK and return ``(alg, key)``. Refuses private or symmetric members."""
    if not isinstance(jwk, dict):
        raise JWKError("each key must be a JSON object")
    if has_private_members(jwk):
        raise JWKError("jwks must not contain private or symmetric key members")
    if jwk.get("use") not in (None, "sig"):
        raise JWKError("key use must be 'sig'")
    alg = algorithm_for(jwk)
    try:
        key: PublicKey
        if jwk["kty"] == "EC":
            key = ECKey.import_key(jwk).public_key
        elif jwk["kty"] == "OKP":
            key = OKPKey.import_key(jwk).public_key  # type: ignore[assignment]
        else:
            key = RSAKey.import_key(jwk).public_key
    except (JoseError, ValueError, KeyError, TypeError) as exc:
        raise JWKError(f"malformed {jwk.get('kty')} key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise JWKError(f"RSA keys must be at least {MIN_RSA_BITS} bits")
    return alg, key


def import_public_jwks(jwks: Any) -> list[tuple[str | None, str, PublicKey]]:
    """Validate a JWK Set; return ``(kid, alg, key)`` per key. ``kid`` must be unique when present."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise JWKError("jwks must be an object with a non-empty 'keys' array")
    out: list[tuple[str | None, str, PublicKey]] = []
    seen: set[str] = set()
    for jwk in jwks["keys"]:
        alg, key = import_public_jwk(jwk)
        kid = jwk.get("kid")
        if kid is not None:
            if not isinstance(kid, str) or kid in seen:
                raise JWKError("kid values must be unique strings")
            seen.add(kid)
        out.append((kid, alg, key))
    return out


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url: used as our signing keys' ``kid``."""
    kty = jwk["kty"]
    key: ECKey | OKPKey | RSAKey
    if kty == "EC":
        key = ECKey.import_key(jwk)
    elif kty == "OKP":
        key = OKPKey.import_key(jwk)
    else:
        key = RSAKey.import_key(jwk)
    return str(key.thumbprint())
