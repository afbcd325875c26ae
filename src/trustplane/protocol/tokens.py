"""RFC 9068 JWT access tokens: issuing them, and reading back our own (introspection, revocation).

Every token has exactly one audience (RFC 8707 ``resource``), ``typ: at+jwt``, a 128-bit ``jti``
(time-ordered, 80 of its bits random: :func:`new_jti`), and the owning legal entity's LEI (``lei``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NewType

from trustplane.ids import new_jti
from trustplane.jose.jws import JWSError, parse
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
    if jws.header.get("typ") != "at+jwt":
        return None
    entry = ring.verify_keys.get(str(jws.header.get("kid")))
    if entry is None or entry[0] != jws.alg or not jws.verify(entry[1]):
        return None
    try:
        claims = jws.claims()
    except JWSError:
        return None
    exp = claims.get("exp")
    current = int(time.time()) if now is None else now
    if claims.get("iss") != issuer or not isinstance(exp, int) or exp <= current:
        return None
    return VerifiedClaims(claims)
