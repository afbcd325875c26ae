"""Verifying a signed event against its publisher's JWKS: the steps the authorization server's
security events (``security_events/verify.py``) and the reference services' trade events
(``reference/events.py``) share. Each caller then checks its own claims.

Importing a JWK (parsing and validating the point) cost twice the signature check itself, and a
consumer verifies every event against the same few keys: the imported set is kept, keyed by the
exact content of the JWKS (its canonical JSON), so a verification of a known set only checks the
signature. A changed set (a rotated, added or removed key) is other content: it is imported afresh
and a removed ``kid`` is no longer found. The cache is bounded (:data:`MAX_CACHED_SETS`, oldest
out first); an unusable set is never kept (it is refused again, with the same reason, each time).
"""

from __future__ import annotations

import threading
from typing import Any

import orjson

from trustplane.jose.jwk import JWKError, PublicKey, import_public_jwks
from trustplane.jose.jws import JWSError, parse

#: Distinct JWK Sets kept imported (a consumer sees one per publisher, two during a rotation).
MAX_CACHED_SETS = 64
#: (kid, alg) -> the keys published under them, per set
Published = dict[tuple[str | None, str], list[PublicKey]]
_SETS: dict[bytes, Published] = {}
_LOCK = threading.Lock()


def published_keys(jwks: Any) -> Published:
    """The keys of ``jwks`` by ``(kid, alg)``, imported once per exact set content; raises
    :class:`JWKError` for an unusable set, as :func:`import_public_jwks` does."""
    try:
        content = orjson.dumps(jwks, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # not JSON: no content to key it by, and import_public_jwks refuses it
        content = None
    if content is not None and (known := _SETS.get(content)) is not None:
        return known
    published: Published = {}
    for kid, alg, key in import_public_jwks(jwks):
        published.setdefault((kid, alg), []).append(key)
    if content is not None:
        with _LOCK:
            while len(_SETS) >= MAX_CACHED_SETS:
                del _SETS[next(iter(_SETS))]
            _SETS[content] = published
    return published


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
        published = published_keys(jwks)
    except JWKError as exc:
        raise refused(f"unusable JWKS: {exc}") from None
    kid = header.get("kid")
    keys = published.get((kid, parsed.alg), []) if isinstance(kid, str | None) else []
    if not keys or not any(parsed.verify(key) for key in keys):
        raise refused("the signature does not verify with the publisher's keys")
    try:
        return parsed.claims()
    except JWSError as exc:
        raise refused(str(exc)) from None
