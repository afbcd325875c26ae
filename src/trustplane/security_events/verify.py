"""What a consumer of the security events runs on each one (and :class:`VerifyingConsumer` does).

An event is refused unless: it is a compact JWS with ``typ: security-event+jwt`` (a SET, an access
token or any other JWT of ours is refused: RFC 8725 §3.11), its algorithm is on the allow-list, the
key named by ``kid`` in the publisher's JWKS verifies it under the algorithm that key is published
for, ``iss`` is the publisher, and it has an event id (``jti``), a ``type`` and a ledger ``seq``.
"""

from __future__ import annotations

from typing import Any

from trustplane.events.jetstream import Refused
from trustplane.jose.jwk import JWKError, import_public_jwks
from trustplane.jose.jws import JWSError, parse
from trustplane.security_events.stream import EVENT_TYP


class EventRefused(Refused):
    """An event whose form, key or signature does not verify: never acted on."""


def verify_event(compact: str | bytes, jwks: Any, *, issuer: str) -> dict[str, Any]:
    """The claims of a verified event, or :class:`EventRefused`."""
    try:
        parsed = parse(compact.decode("ascii") if isinstance(compact, bytes) else compact)
    except (JWSError, UnicodeDecodeError) as exc:
        raise EventRefused(f"not a compact JWS: {exc}") from None
    header = parsed.header
    if header.get("typ") != EVENT_TYP:
        raise EventRefused(f"typ must be {EVENT_TYP}")
    try:
        published = import_public_jwks(jwks)
    except JWKError as exc:
        raise EventRefused(f"unusable JWKS: {exc}") from None
    keys = [key for kid, alg, key in published if kid == header.get("kid") and alg == parsed.alg]
    if not keys or not any(parsed.verify(key) for key in keys):
        raise EventRefused("the signature does not verify with the publisher's keys")
    try:
        claims = parsed.claims()
    except JWSError as exc:
        raise EventRefused(str(exc)) from None
    if claims.get("iss") != issuer:
        raise EventRefused("wrong issuer")
    if not isinstance(claims.get("jti"), str) or not isinstance(claims.get("type"), str):
        raise EventRefused("no event id or type")
    if type(claims.get("seq")) is not int:
        raise EventRefused("no ledger position (seq)")
    return claims
