"""The verified subject-token cache (``oauth.exchange.verified``) on its own: what it serves, and
when it verifies again (key gone or replaced in the ring, bound reached, expired on arrival)."""

from __future__ import annotations

import time

from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.jose.jws import Signer, parse
from trustplane.keys.service import KeyRing
from trustplane.oauth.exchange.verified import VerifiedOwnTokens
from trustplane.protocol.tokens import issue_access_token

ISSUER = "https://as.example"


def ring_with(key: ec.EllipticCurvePrivateKey, kid: str = "k1") -> KeyRing:
    signer = Signer(key, "ES256", kid, typ="at+jwt")
    return KeyRing(signer, {kid: ("ES256", key.public_key())})


def token(ring: KeyRing, lifetime: int = 300, subject: str = "alice") -> str:
    return issue_access_token(
        ring, issuer=ISSUER, subject=subject, client_id="c1", audience="https://api.example",
        scopes=("order:create",), lifetime=lifetime,
    ).token  # fmt: skip


class Rings:
    def __init__(self, ring: KeyRing) -> None:
        self.current = ring

    def __call__(self) -> KeyRing:
        return self.current


def test_a_token_is_verified_once_then_served() -> None:
    rings = Rings(ring_with(ec.generate_private_key(ec.SECP256R1())))
    cache, t, now = VerifiedOwnTokens(rings, ISSUER), token(rings.current), int(time.time())
    first, second = cache.read(t, now), cache.read(t, now)
    assert first is not None
    assert first == second
    assert (cache.misses, cache.hits, len(cache)) == (1, 1, 1)


def test_a_key_no_longer_in_the_ring_is_not_trusted_from_the_cache() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    rings = Rings(ring_with(key))
    cache, t, now = VerifiedOwnTokens(rings, ISSUER), token(rings.current), int(time.time())
    assert cache.read(t, now) is not None
    rings.current = ring_with(ec.generate_private_key(ec.SECP256R1()), kid="k2")  # k1 retired
    assert cache.read(t, now) is None
    assert (cache.hits, len(cache)) == (0, 0)
    rings.current = ring_with(ec.generate_private_key(ec.SECP256R1()))  # another key named k1
    assert cache.read(t, now) is None


def test_a_reloaded_ring_verifies_again() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    rings = Rings(ring_with(key))
    cache, t, now = VerifiedOwnTokens(rings, ISSUER), token(rings.current), int(time.time())
    cache.read(t, now)
    rings.current = ring_with(key)  # the same key, loaded again: a new object
    assert cache.read(t, now) is not None
    assert (cache.misses, cache.hits) == (2, 0)


def test_the_oldest_entry_goes_first_and_an_expired_token_never_enters() -> None:
    rings = Rings(ring_with(ec.generate_private_key(ec.SECP256R1())))
    cache, now = VerifiedOwnTokens(rings, ISSUER, max_entries=2), int(time.time())
    a, b, c = (token(rings.current, subject=s) for s in "abc")
    for t in (a, b, c):
        cache.read(t, now)
    assert len(cache) == 2
    cache.read(b, now), cache.read(c, now)
    assert cache.hits == 2
    cache.read(a, now)  # evicted: verified again
    assert cache.misses == 4
    expired = token(rings.current, lifetime=-1)
    claims = cache.read(expired, now)
    assert claims is not None
    assert claims["exp"] < now
    assert expired not in cache._entries


def test_known_serves_only_what_read_verified_and_still_holds() -> None:
    """``known`` never verifies: an unseen token is None, a verified one is served until its exp
    or until its key leaves the ring (then dropped, for ``read`` to verify again)."""
    rings = Rings(ring_with(ec.generate_private_key(ec.SECP256R1())))
    cache, t, now = VerifiedOwnTokens(rings, ISSUER), token(rings.current), int(time.time())
    assert cache.known(t, now) is None
    assert cache.misses == 0  # nothing was verified by asking
    claims = cache.read(t, now)
    assert claims is not None
    assert cache.known(t, now) == claims
    assert cache.known(t, claims["exp"]) is None  # at its exp: dropped
    assert len(cache) == 0
    assert cache.read(t, now) == claims
    rings.current = ring_with(ec.generate_private_key(ec.SECP256R1()), kid="k2")
    assert cache.known(t, now) is None
    assert len(cache) == 0


def _refused_tokens(ring: KeyRing) -> dict[str, str]:
    other = ring_with(ec.generate_private_key(ec.SECP256R1()))
    base = {"iss": ISSUER, "sub": "alice", "exp": int(time.time()) + 300, "jti": "j"}
    return {
        "typ JWT": ring.require_signer().with_typ("JWT").sign(base),
        "another key under our kid": other.require_signer().sign(base),
        "another issuer": ring.require_signer().sign({**base, "iss": "https://other.example"}),
        "exp not an integer": ring.require_signer().sign({**base, "exp": "soon"}),
        "unknown kid": Signer(
            ec.generate_private_key(ec.SECP256R1()), "ES256", "k9", typ="at+jwt"
        ).sign(base),
    }


def test_verify_of_a_parsed_token_refuses_what_read_access_token_refuses() -> None:
    """``verify`` (the caller's parse reused) keeps every check of ``read``: type, key, signature,
    issuer, an integer ``exp``; nothing refused enters the cache."""
    rings = Rings(ring_with(ec.generate_private_key(ec.SECP256R1())))
    now = int(time.time())
    for case, text in _refused_tokens(rings.current).items():
        cache = VerifiedOwnTokens(rings, ISSUER)
        jws = parse(text)
        assert cache.verify(text, jws, jws.claims(), now) is None, case
        assert cache.read(text, now) is None, case
        assert len(cache) == 0, case
    cache, t = VerifiedOwnTokens(rings, ISSUER), token(rings.current)
    jws = parse(t)
    claims = cache.verify(t, jws, jws.claims(), now)
    assert claims is not None
    assert cache.known(t, now) == claims
