"""Verification of DPoP proofs (RFC 9449 §4.2, §4.3). Framework-free.

Every check of §4.3, in the order made here (the RFC allows any order); each failure is
``invalid_dpop_proof`` unless noted:

1. exactly one ``DPoP`` header value;
2. it is one compact JWS (at most :data:`MAX_PROOF_LENGTH` characters);
3. ``typ`` is ``dpop+jwt`` (RFC 7515 §4.1.9: in any case, or as ``application/dpop+jwt``);
4. ``alg`` is ES256, EdDSA or PS256 (``none``, HS* and RS256 are refused) and allowed by policy;
5. ``jwk`` is present, a public key of the kind ``alg`` needs, with no private member
   (``d``, ``p``, ``q``, ``dp``, ``dq``, ``qi``, ``oth``, ``k``);
6. the signature verifies with that ``jwk``;
7. ``jti`` (a string of at most :data:`MAX_JTI_LENGTH` printable characters: PostgreSQL refuses a
   NUL, which would fail the replay cache's write, never the proof), ``htm``, ``htu`` and a numeric
   ``iat`` are present;
8. ``htm`` equals the request method (case-sensitive, RFC 9110 §9.1);
9. ``htu`` equals the request URI without query and fragment, after RFC 3986 normalization
   (:mod:`trustplane.dpop.htu`);
10. ``iat`` is at most ``max_age`` seconds in the past and ``max_ahead`` in the future (§11.1);
11. at a resource server: ``ath`` is the base64url SHA-256 of the access token presented, and the
    proof's key is the one the token is bound to (``cnf.jkt``; a mismatch is ``invalid_token``, as in
    the §7.1 example);
12. when nonces are required: ``nonce`` is one this deployment issued and still accepts, else
    ``use_dpop_nonce`` with a fresh nonce in ``DPoP-Nonce``;
13. the ``jti`` has not been used with this key before (single use, remembered until the proof's
    ``iat`` window has passed). Consumed last, so a refused proof never uses up its ``jti``.

The proof's key is identified by its RFC 7638 thumbprint (``jkt``), which the token endpoint puts in
``cnf.jkt`` of the tokens it issues.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trustplane.dpop.errors import InvalidDpopProofError, UseDpopNonceError
from trustplane.dpop.htu import HtuError, normalize_htu
from trustplane.dpop.nonce import NonceSource
from trustplane.dpop.replay import REPLAY_NAMESPACE, JtiStore
from trustplane.errors import InvalidTokenError
from trustplane.jose.jwk import (
    JWKError,
    PublicKey,
    has_private_members,
    import_public_jwk,
    thumbprint,
)
from trustplane.jose.jws import JWSError, ParsedJWS, b64url_encode, parse

ALGORITHMS = ("ES256", "EdDSA", "PS256")
PROOF_TYPE = "dpop+jwt"
#: RFC 7515 §4.1.9: media types compare case-insensitively, and "application/" is implied.
PROOF_TYPES = frozenset({PROOF_TYPE, "application/" + PROOF_TYPE})
#: A proof carries a public key in its header: a 4096-bit RSA key is about 700 characters of it.
MAX_PROOF_LENGTH = 8 * 1024
MAX_JTI_LENGTH = 128
MAX_METHOD_LENGTH = 32
#: Decoded proof headers (``alg`` + ``jwk``) kept: a client signs every proof with the same key, so
#: the key import and its thumbprint are paid once per key, not once per request.
KEY_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class DpopProof:
    """A verified proof: the key's thumbprint (``cnf.jkt``), and what the proof said."""

    jkt: str
    jti: str
    iat: int
    htm: str
    htu: str
    nonce: str | None = None
    ath: str | None = None


@dataclass(frozen=True, slots=True)
class _ProofKey:
    alg: str
    key: PublicKey
    jkt: str


def access_token_hash(access_token: str) -> str:
    """``ath`` (RFC 9449 §4.2): base64url SHA-256 of the ASCII access token."""
    return b64url_encode(hashlib.sha256(access_token.encode("ascii")).digest())


def refused(description: str, reason: str) -> InvalidDpopProofError:
    return InvalidDpopProofError(description, debug=f"dpop_{reason}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class DpopVerifier:
    """Verifies proofs for one server. ``replay``: the ``jti`` store; ``nonces``: when given, every
    proof must carry a current nonce of this deployment; ``max_age``/``max_ahead``: the accepted
    ``iat`` window (seconds before / after now); ``algorithms``: narrowing of :data:`ALGORITHMS`."""

    def __init__(
        self,
        replay: JtiStore,
        *,
        nonces: NonceSource | None = None,
        max_age: int = 60,
        max_ahead: int = 10,
        algorithms: Sequence[str] = ALGORITHMS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not algorithms or not set(algorithms) <= set(ALGORITHMS):
            raise ValueError(f"DPoP algorithms must be a non-empty subset of {ALGORITHMS}")
        if max_age < 1 or max_ahead < 0:
            raise ValueError("max_age must be positive and max_ahead not negative")
        self.replay, self.nonces, self.clock = replay, nonces, clock
        self.max_age, self.max_ahead = max_age, max_ahead
        self.algorithms = tuple(a for a in ALGORITHMS if a in algorithms)
        self._keys: dict[str, _ProofKey] = {}

    @property
    def algs(self) -> str:
        """The ``algs`` of a ``WWW-Authenticate: DPoP`` challenge and of the RFC 8414
        ``dpop_signing_alg_values_supported`` metadata (as a list)."""
        return " ".join(self.algorithms)

    def fresh_nonce(self, now: float | None = None) -> str | None:
        """The nonce to send in ``DPoP-Nonce`` (``None`` when nonces are not required)."""
        return None if self.nonces is None else self.nonces.current(self._now(now))

    async def verify_for_token_endpoint(
        self,
        header_values: Sequence[str],
        method: str,
        url: str,
        now: float | None = None,
        *,
        consume: bool = True,
    ) -> DpopProof:
        """RFC 9449 §5: the proof of a token request (no access token, so no ``ath``).
        ``consume=False``: every check but the ``jti``'s single use, which the caller then commits
        itself (:meth:`replay_key`, :meth:`replay_expiry`), e.g. with the token endpoint's outcome."""
        return await self._verify(
            header_values, method, url, None, None, self._now(now), consume=consume
        )

    @staticmethod
    def replay_key(proof: DpopProof) -> str:
        """The replay namespace of the proof's key (``dpop-proof:<jkt>``)."""
        return REPLAY_NAMESPACE + proof.jkt

    def replay_expiry(self, proof: DpopProof) -> int:
        """Until when the proof's ``jti`` must be remembered: past it, ``iat`` is refused anyway."""
        return proof.iat + self.max_age + self.max_ahead + 1

    async def verify_for_resource(
        self,
        header_values: Sequence[str],
        method: str,
        url: str,
        access_token: str,
        bound_jkt: str,
        now: float | None = None,
    ) -> DpopProof:
        """RFC 9449 §7: the proof accompanying ``access_token`` whose ``cnf.jkt`` is ``bound_jkt``."""
        return await self._verify(
            header_values, method, url, access_token, bound_jkt, self._now(now)
        )

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    async def _verify(
        self,
        header_values: Sequence[str],
        method: str,
        url: str,
        access_token: str | None,
        bound_jkt: str | None,
        now: float,
        *,
        consume: bool = True,
    ) -> DpopProof:
        jws = self._single_jws(header_values)
        key = self._proof_key(jws)
        if not jws.verify(key.key):
            raise refused("the DPoP proof signature does not verify", "signature")
        proof = self._check_claims(jws, key.jkt, method, url, now)
        if access_token is not None:
            self._check_token(proof, access_token, bound_jkt)
        self._check_nonce(proof.nonce, now)
        if not consume:
            return proof
        expires_at = self.replay_expiry(proof)
        if not await self.replay.consume(self.replay_key(proof), proof.jti, expires_at):
            raise refused("the DPoP proof has already been used (jti replayed)", "replay")
        return proof

    @staticmethod
    def _single_jws(header_values: Sequence[str]) -> ParsedJWS:
        if len(header_values) == 0:
            raise refused("a DPoP proof is required (DPoP header)", "missing")
        if len(header_values) > 1:
            raise refused("exactly one DPoP header is allowed", "repeated")
        value = header_values[0].strip(" \t")
        if len(value) > MAX_PROOF_LENGTH:
            raise refused("the DPoP proof is too large", "too_large")
        try:
            return parse(value)
        except JWSError as exc:
            raise refused(f"the DPoP header is not a well-formed JWT: {exc}", "malformed") from None

    def _proof_key(self, jws: ParsedJWS) -> _ProofKey:
        """Steps 3-5, cached per encoded header (same key, same header, every request)."""
        encoded = jws.signing_input.split(b".", 1)[0].decode("ascii")
        cached = self._keys.get(encoded)
        if cached is not None:
            return cached
        typ = jws.header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in PROOF_TYPES:
            raise refused("the DPoP proof typ must be dpop+jwt", "typ")
        if jws.alg not in self.algorithms:
            raise refused(f"the DPoP proof algorithm {jws.alg} is not accepted", "algorithm")
        jwk = jws.header.get("jwk")
        if not isinstance(jwk, dict):
            raise refused("the DPoP proof header must carry the public key (jwk)", "jwk")
        if has_private_members(jwk):
            raise refused("the DPoP proof jwk must not contain a private key", "private_key")
        try:
            key_alg, key = import_public_jwk(jwk)
        except JWKError as exc:
            raise refused(f"the DPoP proof jwk is unusable: {exc}", "jwk") from None
        if key_alg != jws.alg:
            raise refused(f"the jwk is not a key for {jws.alg}", "algorithm")
        entry = _ProofKey(jws.alg, key, thumbprint(jwk))
        if len(self._keys) >= KEY_CACHE_SIZE:
            self._keys.pop(next(iter(self._keys)))
        self._keys[encoded] = entry
        return entry

    def _check_claims(
        self, jws: ParsedJWS, jkt: str, method: str, url: str, now: float
    ) -> DpopProof:
        try:
            claims = jws.claims()
        except JWSError as exc:
            raise refused(f"the DPoP proof payload is malformed: {exc}", "malformed") from None
        jti, htm, htu, iat = (claims.get(n) for n in ("jti", "htm", "htu", "iat"))
        if not isinstance(jti, str) or not jti:
            raise refused("the DPoP proof must carry a jti", "jti")
        if len(jti) > MAX_JTI_LENGTH:
            raise refused(f"the DPoP proof jti is longer than {MAX_JTI_LENGTH}", "jti")
        if not jti.isprintable():  # a NUL, a control character: no replay store may refuse it
            raise refused("the DPoP proof jti must be printable characters", "jti")
        if not isinstance(htm, str) or not isinstance(htu, str) or not _number(iat):
            raise refused("the DPoP proof must carry htm, htu and a numeric iat", "claims")
        if len(htm) > MAX_METHOD_LENGTH or htm != method:
            raise refused("the DPoP proof htm does not match the request method", "htm")
        if not _same_uri(htu, url):
            raise refused("the DPoP proof htu does not match the request URI", "htu")
        assert isinstance(iat, int | float)
        if iat < now - self.max_age:
            raise refused("the DPoP proof is too old (iat)", "iat_too_old")
        if iat > now + self.max_ahead:
            raise refused("the DPoP proof is issued in the future (iat)", "iat_in_future")
        nonce, ath = claims.get("nonce"), claims.get("ath")
        return DpopProof(
            jkt,
            jti,
            math.ceil(iat),
            htm,
            htu,
            nonce if isinstance(nonce, str) else None,
            ath if isinstance(ath, str) else None,
        )

    @staticmethod
    def _check_token(proof: DpopProof, access_token: str, bound_jkt: str | None) -> None:
        if proof.ath is None:
            raise refused("the DPoP proof must carry ath (the access token hash)", "ath")
        if not hmac.compare_digest(proof.ath.encode(), access_token_hash(access_token).encode()):
            raise refused("the DPoP proof ath does not match the access token", "ath")
        if bound_jkt is not None and not hmac.compare_digest(
            proof.jkt.encode(), bound_jkt.encode()
        ):
            raise InvalidTokenError(
                "the DPoP proof key is not the key the access token is bound to",
                debug="dpop_key_binding",
            )

    def _check_nonce(self, nonce: str | None, now: float) -> None:
        if self.nonces is None:
            return
        if nonce is None:
            raise UseDpopNonceError(
                self.nonces.current(now), "a DPoP nonce is required", debug="dpop_nonce_missing"
            )
        if not self.nonces.accepts(nonce, now):
            raise UseDpopNonceError(
                self.nonces.current(now),
                "the DPoP nonce is stale or unknown; use the new one",
                debug="dpop_nonce_stale",
            )


def _same_uri(htu: str, url: str) -> bool:
    try:
        claimed = normalize_htu(htu)
    except HtuError:
        return False
    try:
        actual = normalize_htu(url)
    except HtuError:  # a request URL no proof can name (e.g. a strange Host): refuse, never 500
        return False
    return claimed == actual
