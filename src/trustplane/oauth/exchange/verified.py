"""Our own access tokens presented as subject tokens, verified once per process.

One subject token is commonly exchanged several times: the reference lifecycle exchanges Alice's
token for each audience it needs (broker, then clearing), and a service that calls several APIs on a
user's behalf does the same. The signature check (ES256 verification, the token's parse) is the
same work every time for the same bytes, so its result is kept:

- keyed by the exact token text: any other byte (a re-encoded signature, a changed claim) is
  another key, verified in full;
- used only while the token's ``exp`` is in the future (an entry at or past it is dropped) and
  while the key that verified it is still in the key ring under the same ``kid`` (a ring reloaded
  after a rotation or a retirement verifies again);
- bounded (:data:`MAX_VERIFIED` entries, the oldest out first), and only tokens whose signature
  verified with our keys get in, so no caller can fill it with junk.

Only the signature check is kept. Everything else about a subject token is checked on every
exchange (``oauth.exchange.subject``): its expiry, the exchanging client's right, its client still
active, its mandate usable now, and its revocation with the outcome (a ``NotRevoked`` condition in
the group commit that records the exchange).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trustplane.jose.jwk import PublicKey
from trustplane.jose.jws import JWSError, ParsedJWS, parse
from trustplane.keys.service import KeyRing
from trustplane.protocol.tokens import VerifiedClaims, check_access_token

#: ~1-2 kB per entry (our tokens, their claims): a few MB at most.
MAX_VERIFIED = 2048


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: VerifiedClaims
    kid: str
    key: PublicKey
    exp: int


class VerifiedOwnTokens:
    """``read`` is :func:`~trustplane.protocol.tokens.read_access_token` (without its expiry
    check: the caller refuses an expired token with its own error), remembered per token;
    ``verify`` is the same for a token its caller has parsed already (one parse per miss)."""

    def __init__(
        self, ring: Callable[[], KeyRing], issuer: str, max_entries: int = MAX_VERIFIED
    ) -> None:
        self._ring, self._issuer, self._max = ring, issuer, max_entries
        #: Insertion-ordered: the oldest entry is evicted first, in O(1).
        self._entries: OrderedDict[str, _Verified] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, token: str, now: int) -> VerifiedClaims | None:
        """The claims of a token verified before, if its entry still holds at ``now`` (not expired,
        its key still in the ring); None otherwise, without reading the token (an entry that no
        longer holds is dropped: :meth:`read` verifies the token again)."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        current = self._ring().verify_keys.get(entry.kid)
        if entry.exp > now and current is not None and current[1] is entry.key:
            self.hits += 1
            return entry.claims
        del self._entries[token]
        return None

    def read(self, token: str, now: int) -> VerifiedClaims | None:
        """The token's verified claims (possibly expired), or None if it is not a valid access
        token of ours (foreign, forged, malformed, signed by a key no longer in the ring)."""
        claims = self.known(token, now)
        if claims is not None:
            return claims
        try:
            jws = parse(token)
            unverified = jws.claims()
        except JWSError:
            return None
        return self.verify(token, jws, unverified, now)

    def verify(
        self, token: str, jws: ParsedJWS, unverified: dict[str, Any], now: int
    ) -> VerifiedClaims | None:
        """:meth:`read` for a token the caller has parsed already (``jws``, its ``unverified``
        claims) and found not :meth:`known`: :func:`~trustplane.protocol.tokens.check_access_token`,
        the checks :func:`~trustplane.protocol.tokens.read_access_token` makes too (no expiry
        check here), without decoding the token again."""
        self.misses += 1
        checked = check_access_token(self._ring(), jws, unverified, issuer=self._issuer)
        if checked is None:
            return None
        claims, kid, key = checked
        exp = int(claims["exp"])
        if exp > now:
            self._remember(token, claims, kid, key, exp)
        return claims

    def _remember(
        self, token: str, claims: VerifiedClaims, kid: str, key: PublicKey, exp: int
    ) -> None:
        if len(self._entries) >= self._max:
            self._entries.popitem(last=False)
        self._entries[token] = _Verified(claims, kid, key, exp)
