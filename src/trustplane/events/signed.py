"""Verifying a signed event against its publisher's JWKS: the steps the authorization server's
security events (``security_events/verify.py``) and the reference services' trade events
(``reference/events.py``) share. Each caller then checks its own claims."""

from __future__ import annotations

from typing import Any

from trustplane.jose.jwk import JWKError, import_public_jwks
from trustplane.jose.jws import JWSError, parse


def verified_claims(
    compact: str | bytes, jwks: Any, *, typ: str, alg: str | None, refused: type[Exception]
) -> dict[str, Any]:
    """The claims of ``compact`` once its form and signature verify, or ``refused``: a compact JWS
    whose ``typ`` is ``typ`` (another JWT of ours is refused, RFC 8725 §3.11), whose ``alg`` is
    ``alg`` when one is required (else any on the JOSE allow-list), signed by the JWKS key named by
    ``kid`` and published for that algorithm."""
    try:
        parsed = parse(compact.decode("ascii") if isinstance(compact, bytes) else compact)
    except (JWSError, UnicodeDecodeError) as exc:
        raise refused(f"not a compact JWS: {exc}") from None
    header = parsed.header
    if alg is not None and header.get("alg") != alg:
        raise refused(f"alg must be {alg}")
    if header.get("typ") != typ:
        raise refused(f"typ must be {typ}")
    try:
        published = import_public_jwks(jwks)
    except JWKError as exc:
        raise refused(f"unusable JWKS: {exc}") from None
    kid = header.get("kid")
    keys = [key for k_kid, k_alg, key in published if k_kid == kid and k_alg == parsed.alg]
    if not keys or not any(parsed.verify(key) for key in keys):
        raise refused("the signature does not verify with the publisher's keys")
    try:
        return parsed.claims()
    except JWSError as exc:
        raise refused(str(exc)) from None
