"""RFC 9068 JWT access tokens: issuing them, and reading back our own (introspection, revocation).

Every token has exactly one audience (RFC 8707 ``resource``), ``typ: at+jwt``, a 128-bit ``jti``
(time-ordered, 80 of its bits random: :func:`new_jti`), and the owning legal entity's LEI (``lei``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NewType

from trustplane.ids import new_jti
from trustplane.jose.jwk import PublicKey
from trustplane.jose.jws import JWSError, ParsedJWS, parse
from trustplane.keys.service import KeyRing

#: Claims of a token whose signature, issuer, type and expiry have been checked.
VerifiedClaims = NewType("VerifiedClaims", dict[str, Any])


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    claims: dict[str, Any]
    expires_in: int


def issue_access_token(
    ring: KeyRing,
    *,
    issuer: str,
    subject: str,
    client_id: str,
    audience: str,
    scopes: tuple[str, ...],
    lifetime: int,
    extra: dict[str, Any] | None = None,
    not_after: int | None = None,
) -> IssuedToken:
    """``not_after``: an ``exp`` the token must never pass (a derived token never outlives the token
    it was derived from, whatever second the clock ticks over to between the two readings)."""
    now = int(time.time())
    if not_after is not None:
        lifetime = min(lifetime, not_after - now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "exp": now + lifetime,
        "iat": now,
        "nbf": now,
        "jti": new_jti(),
        "client_id": client_id,
        "scope": " ".join(scopes),
    }
    if extra:
        claims.update(extra)
    return IssuedToken(ring.require_signer().sign(claims), claims, lifetime)


def read_access_token(
    ring: KeyRing, token: str, *, issuer: str, now: int | None = None
) -> VerifiedClaims | None:
    """Our own access token, verified; None for anything else (foreign, forged, expired, malformed).

    Our clock is the one that set ``exp``, so no skew is granted here.
    """
    try:
        jws = parse(token)
    except JWSError:
        return None
    checked = check_access_token(ring, jws, None, issuer=issuer)
    if checked is None:
        return None
    claims = checked[0]
    current = int(time.time()) if now is None else now
    return claims if claims["exp"] > current else None


def check_access_token(
    ring: KeyRing, jws: ParsedJWS, claims: dict[str, Any] | None, *, issuer: str
) -> tuple[VerifiedClaims, str, PublicKey] | None:
    """What makes a parsed JWS one of our access tokens, but for its expiry (the caller's, with its
    own error): ``typ: at+jwt``, the ring's key and algorithm under the header's ``kid``, the
    signature, our ``iss``, an integer ``exp``. The claims, the ``kid`` and the key that verified
    it; None for anything else. ``claims``: the payload if the caller decoded it already (it is
    read only after the signature verified), else decoded here. The one copy of these checks
    (:func:`read_access_token`, the exchange's verified-token cache)."""
    if jws.header.get("typ") != "at+jwt":
        return None
    kid = str(jws.header.get("kid"))
    entry = ring.verify_keys.get(kid)
    if entry is None or entry[0] != jws.alg or not jws.verify(entry[1]):
        return None
    if claims is None:
        try:
            claims = jws.claims()
        except JWSError:
            return None
    if claims.get("iss") != issuer or not isinstance(claims.get("exp"), int):
        return None
    return VerifiedClaims(claims), kid, entry[1]
