"""What a consumer of the security events runs on each one (and :class:`VerifyingConsumer` does).

An event is refused unless: it is a compact JWS with ``typ: security-event+jwt`` (a SET, an access
token or any other JWT of ours is refused: RFC 8725 §3.11), its algorithm is on the allow-list, the
key named by ``kid`` in the publisher's JWKS verifies it under the algorithm that key is published
for, ``iss`` is the publisher, and it has an event id (``jti``), a ``type`` and a ledger ``seq``.
"""

from __future__ import annotations

from typing import Any

from trustplane.events.jetstream import Refused
from trustplane.events.signed import verified_claims
from trustplane.security_events.stream import EVENT_TYP


class EventRefused(Refused):
    """An event whose form, key or signature does not verify: never acted on."""


def verify_event(compact: str | bytes, jwks: Any, *, issuer: str) -> dict[str, Any]:
    """The claims of a verified event, or :class:`EventRefused`."""
    claims = verified_claims(compact, jwks, typ=EVENT_TYP, alg=None, refused=EventRefused)
    if claims.get("iss") != issuer:
        raise EventRefused("wrong issuer")
    if not isinstance(claims.get("jti"), str) or not isinstance(claims.get("type"), str):
        raise EventRefused("no event id or type")
    if type(claims.get("seq")) is not int:
        raise EventRefused("no ledger position (seq)")
    return claims
