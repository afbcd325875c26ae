"""Validation of RFC 9068 JWT access tokens at a resource server. Framework-free.

What a token must be to pass, in the order it is checked (RFC 9068 §4, RFC 8725):
1. a compact JWS signed with ES256, EdDSA or PS256 (``none`` and HS* are unrepresentable in
   ``trustplane.jose.jws``: an HS256 token "signed" with the issuer's public key fails at parsing);
2. ``typ`` is ``at+jwt`` (or ``application/at+jwt``): an ID token or any other JWT is refused;
3. ``iss`` is exactly one of the configured trusted issuers, and the algorithm is one it may use;
4. the signature verifies with a key from that issuer's JWKS, selected by ``kid``;
5. ``aud`` is exactly this resource server's audience (one audience: a token for several resource
   servers could be replayed from one to the other);
6. ``exp``, ``nbf`` and ``iat`` hold with ``clock_skew`` seconds of tolerance;
7. ``sub``, ``client_id``, ``jti`` and ``iat`` are present (RFC 9068 §2.2);
8. when a :class:`RevocationCheck` is configured, the issuer still says the token is active.

A token that passed steps 1-7 is remembered (keyed by the token string, until it expires), so a client
reusing its token for its lifetime pays for the signature once; step 8 runs on every request.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NewType

from trustplane.errors import InvalidTokenError
from trustplane.jose.jws import JWSError, parse
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep.introspection import RevocationCheck
from trustplane.pep.keys import ConfigurationError, IssuerKeys, TrustedIssuer, check_url

#: Claims of a token whose signature, type, issuer, audience and times have been checked.
VerifiedClaims = NewType("VerifiedClaims", dict[str, Any])
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
VERIFIED_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A validated access token: what the resource server and the PDP may rely on."""

    token: str
    issuer: str
    subject: str
    client_id: str
    audience: str
    scopes: frozenset[str]
    jti: str
    expires_at: int
    claims: VerifiedClaims


def refused(description: str, reason: str) -> InvalidTokenError:
    """An RFC 6750 ``invalid_token`` error; ``reason`` is a short slug for logs and metrics."""
    return InvalidTokenError(description, debug=reason)


#: JSON numbers as orjson gives them (``type(True)`` is ``bool``, so a boolean is not a date).
_NUMBER_TYPES = frozenset({int, float})


class TokenValidator:
    def __init__(
        self,
        *,
        audience: str,
        issuers: Sequence[TrustedIssuer],
        clock_skew: int = 60,
        fetcher: OutboundFetcher | None = None,
        jwks_ttl: float = 300.0,
        jwks_min_refetch: float = 30.0,
        revocation: RevocationCheck | None = None,
    ) -> None:
        if not audience:
            raise ConfigurationError("audience is required")
        if not issuers:
            raise ConfigurationError("at least one trusted issuer is required")
        self.audience, self.clock_skew, self.revocation = audience, clock_skew, revocation
        self._own_fetcher = fetcher is None
        self.fetcher = fetcher or OutboundFetcher(OutboundPolicy())
        for trusted in issuers:
            check_url(trusted.issuer, "issuer", self.fetcher)
            if trusted.jwks_uri is not None:
                check_url(trusted.jwks_uri, "jwks_uri", self.fetcher)
        self._issuers = {
            t.issuer: IssuerKeys(t, self.fetcher, ttl=jwks_ttl, min_refetch=jwks_min_refetch)
            for t in issuers
        }
        #: Insertion-ordered: the oldest entry is evicted first, in O(1) (``popitem(last=False)``).
        self._verified: OrderedDict[str, AccessToken] = OrderedDict()

    def issuer_keys(self, issuer: str) -> IssuerKeys | None:
        """The cached key set of a trusted issuer (shared with :mod:`trustplane.pep.txn_token`)."""
        return self._issuers.get(issuer)

    async def validate(self, token: str) -> AccessToken:
        """The validated token, or :class:`InvalidTokenError`. Raises ``KeySourceError`` /
        ``IntrospectionUnavailable`` when the issuer cannot be reached (the caller fails closed)."""
        now = time.time()
        access = self._verified.get(token)
        if access is None or access.expires_at + self.clock_skew <= now:
            access = await self._verify(token, now)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
            self._verified[token] = access
        if self.revocation is not None and not await self.revocation.is_active(
            token, f"{access.issuer} {access.jti}", access.expires_at
        ):
            raise refused("the access token has been revoked", "revoked")
        return access

    async def _verify(self, token: str, now: float) -> AccessToken:
        try:
            jws = parse(token)
            claims = jws.claims()
        except JWSError as exc:
            raise refused(f"malformed access token: {exc}", "malformed") from None
        header, alg = jws.header, jws.alg
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
            raise refused("the token is not an access token (typ must be at+jwt)", "typ")
        iss = claims.get("iss")
        keys = self._issuers.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise refused("the token's issuer is not trusted here", "untrusted_issuer")
        if alg not in keys.trusted.algorithms:
            raise refused(f"algorithm {alg} is not accepted from this issuer", "algorithm")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise refused("kid must be a string", "malformed")
        candidates = await keys.candidates(kid, alg)
        if not any(jws.verify(key) for key in candidates):
            raise refused("the token signature does not verify", "signature")
        return self._check_claims(token, VerifiedClaims(claims), now)

    def _check_claims(self, token: str, claims: VerifiedClaims, now: float) -> AccessToken:
        aud = claims.get("aud")
        if aud != self.audience and aud != [self.audience]:
            raise refused("the token is not meant for this resource server", "audience")
        exp, nbf, iat = claims.get("exp"), claims.get("nbf", 0), claims.get("iat")
        numbers = _NUMBER_TYPES
        if type(exp) not in numbers or type(nbf) not in numbers or type(iat) not in numbers:
            raise refused("exp, iat and nbf must be numeric dates", "malformed")
        skew = self.clock_skew
        if exp + skew <= now:  # type: ignore[operator]
            raise refused("the access token has expired", "expired")
        if nbf - skew > now or iat - skew > now:  # type: ignore[operator]
            raise refused("the access token is not valid yet", "not_yet_valid")
        sub, client_id, jti = claims.get("sub"), claims.get("client_id"), claims.get("jti")
        scope = claims.get("scope", "")
        if not (
            sub
            and client_id
            and jti
            and isinstance(sub, str)
            and isinstance(client_id, str)
            and isinstance(jti, str)
        ):
            raise refused("sub, client_id and jti are required", "malformed")
        if not isinstance(scope, str):
            raise refused("scope must be a string", "malformed")
        return AccessToken(
            token,
            claims["iss"],
            sub,
            client_id,
            self.audience,
            frozenset(scope.split()),
            jti,
            int(exp),  # type: ignore[arg-type]
            claims,
        )

    async def aclose(self) -> None:
        if self._own_fetcher:
            await self.fetcher.aclose()
