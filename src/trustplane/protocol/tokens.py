"""RFC 9068 JWT access tokens: issuing them, and reading back our own (introspection, revocation).

Every token has exactly one audience (RFC 8707 ``resource``), ``typ: at+jwt``, a 128-bit ``jti``
(time-ordered, 80 of its bits random: :func:`new_jti`), and the owning legal entity's LEI (``lei``).
"""

from __future__ import annotations

import binascii
import os
import time
from dataclasses import dataclass
from typing import Any, NewType

from trustplane.jose.jws import JWSError, parse
from trustplane.keys.service import KeyRing

#: Claims of a token whose signature, issuer, type and expiry have been checked.
VerifiedClaims = NewType("VerifiedClaims", dict[str, Any])


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    claims: dict[str, Any]
    expires_in: int


#: Base64's alphabet (``binascii``: ``+/`` where base64url has ``-_``) in the order of the values
#: its characters stand for, and the base64url characters in ASCII order: translating the one to
#: the other makes a :func:`new_jti`'s text sort like its bytes (only URL-safe characters still).
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_ORDERED = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_TO_ORDERED = bytes.maketrans(_BASE64, _ORDERED)


#: Added to the milliseconds: the first six bits are then 16 (``F``) until the year 2109, never 0
#: (``-``, which a command line reads as the start of an option), and the field lasts to the year
#: 8600.
_TIME_BASE = 16 << 42


def new_jti() -> str:
    """A new identifier (a token's ``jti``, a transaction's ``txn``): 22 URL-safe characters, 128
    bits, of which the first 48 count milliseconds (since the epoch, plus ``_TIME_BASE``) and the
    other 80 are random.

    As unique and as unguessable as our uses need (80 random bits per millisecond; a ``jti`` is no
    secret, the token's signature is what counts, and its ``iat`` tells the time already), but
    increasing with time: the text sorts by the millisecond it was made in. A row keyed by one of
    these (``ssf_derivations``, the ledger's transaction index, ``security_events``) is then added
    at the end of its b-tree, where a random key lands on a random page: on SQLite, one page
    written per batch instead of one per row (docs/token_exchange.md, "Performance"). Nothing reads
    the time back: to every reader a ``jti`` is an opaque string."""
    millis = time.time_ns() // 1_000_000 + _TIME_BASE
    raw = millis.to_bytes(6, "big") + os.urandom(10)
    return binascii.b2a_base64(raw, newline=False)[:22].translate(_TO_ORDERED).decode("ascii")


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
