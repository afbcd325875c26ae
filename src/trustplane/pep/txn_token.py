"""Validation of a Transaction Token (draft-ietf-oauth-transaction-tokens-10) beside the access
token, at a resource server. Framework-free; :class:`trustplane.pep.http.Pep` reads the ``Txn-Token``
header (draft §12.1: exactly one) and calls it.

What a Txn-Token must be to pass, in order (draft §9 and §12.2):
1. a compact JWS whose header ``typ`` is ``txntoken+jwt`` (§9.1);
2. ``iss`` is the access token's issuer (trusted by the :class:`TokenValidator`), the algorithm one
   that issuer may use, and the signature verifies with that issuer's JWKS (the keys the validator
   already fetched and caches). The draft makes ``iss`` optional; this profile requires it, as the
   claim that names the keys (§13.16);
3. ``aud`` is exactly the trust domain this resource server belongs to;
4. ``exp`` and ``iat`` hold with ``clock_skew`` seconds of tolerance (its own, default
   :data:`TXN_CLOCK_SKEW`, at most the access token's: a Txn-Token lives seconds, draft §13.2, and
   the access token's 60 s tolerance would double a 60 s token's life);
5. the REQUIRED claims are there (§9.2): ``txn``, ``sub`` and ``scope`` non-empty strings, ``req_wl``
   a string (the workload that requested this token; on a replacement the issuer's
   ``req_wl_chain`` lists the workloads in order); ``txn`` equals the access token's ``txn`` when
   that has one, ``sub`` equals the access token's ``sub``, ``scope`` is within its scopes;
6. ``tctx`` and ``rctx``, when present, are JSON objects nested at most ``MAX_CONTEXT_DEPTH`` deep
   (they go to the PDP). Any other claim is ignored (§9.2).

Any failure is ``invalid_token`` (RFC 6750 §3.1, 401) with a description naming the Txn-Token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from trustplane.errors import InvalidTokenError
from trustplane.jose.jws import JWSError, parse
from trustplane.pep.keys import ConfigurationError
from trustplane.pep.validator import AccessToken, TokenValidator

DRAFT = "draft-ietf-oauth-transaction-tokens-10"
TXN_TOKEN_TYP = "txntoken+jwt"
#: The HTTP header that carries the Txn-Token between workloads (draft §8).
TXN_TOKEN_HEADER = "txn-token"
#: How deep ``tctx`` and ``rctx`` may nest: the draft's examples nest two levels, trustplane's own
#: issuer two; a deeper one is refused before it reaches the PDP (bounded input, fail closed).
MAX_CONTEXT_DEPTH = 8
#: Seconds of clock tolerance on a Txn-Token's ``exp`` and ``iat`` (the issuing deployment's processes
#: and this resource server may disagree by this much; a Txn-Token's life is 60 s by default).
TXN_CLOCK_SKEW = 5


@dataclass(frozen=True, slots=True)
class TxnToken:
    """A validated Txn-Token: the transaction the call belongs to and its context."""

    token: str
    txn: str
    subject: str
    scopes: frozenset[str]
    tctx: dict[str, Any]
    rctx: dict[str, Any]
    req_wl: tuple[str, ...]
    expires_at: int
    claims: dict[str, Any]


def bad_txn_token(description: str, reason: str) -> InvalidTokenError:
    return InvalidTokenError(f"Txn-Token: {description}", debug=f"txn_token_{reason}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _depth(value: object, limit: int) -> bool:
    """True if ``value`` nests at most ``limit`` objects or arrays deep (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            if level > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return True


def _workloads(claims: dict[str, Any]) -> tuple[str, ...]:
    """``req_wl`` (REQUIRED, a string, draft §9.2), or the replacement chain that ends with it."""
    wl, chain = claims.get("req_wl"), claims.get("req_wl_chain")
    if not _text(wl):
        raise bad_txn_token("req_wl is required (a string)", "malformed")
    if chain is None:
        return (str(wl),)
    if not isinstance(chain, list) or not all(_text(w) for w in chain) or chain[-1:] != [wl]:
        raise bad_txn_token("req_wl_chain must list strings, ending with req_wl", "malformed")
    return tuple(chain)


class TxnTokenValidator:
    """``trust_domain``: the ``aud`` every Txn-Token must carry (the issuing deployment's
    ``trust_domain`` setting, by default its issuer). ``clock_skew``: seconds of tolerance on ``exp``
    and ``iat`` (default :data:`TXN_CLOCK_SKEW`; never more than the access token validator's)."""

    def __init__(
        self, validator: TokenValidator, *, trust_domain: str, clock_skew: int = TXN_CLOCK_SKEW
    ) -> None:
        if not trust_domain:
            raise ConfigurationError("trust_domain is required")
        if clock_skew < 0:
            raise ConfigurationError("clock_skew must not be negative")
        self.validator, self.trust_domain = validator, trust_domain
        self.clock_skew = min(clock_skew, validator.clock_skew)

    async def validate(self, raw: str, access: AccessToken) -> TxnToken:
        try:
            jws = parse(raw)
            claims = jws.claims()
        except JWSError as exc:
            raise bad_txn_token(f"malformed: {exc}", "malformed") from None
        if jws.header.get("typ") != TXN_TOKEN_TYP:
            raise bad_txn_token(f"typ must be {TXN_TOKEN_TYP}", "typ")
        iss = claims.get("iss")
        keys = self.validator.issuer_keys(access.issuer)
        if iss != access.issuer or keys is None:
            raise bad_txn_token("not issued by the access token's issuer", "issuer")
        if jws.alg not in keys.trusted.algorithms:
            raise bad_txn_token(f"algorithm {jws.alg} is not accepted", "algorithm")
        kid = jws.header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise bad_txn_token("kid must be a string", "malformed")
        if not any(jws.verify(key) for key in await keys.candidates(kid, jws.alg)):
            raise bad_txn_token("the signature does not verify", "signature")
        return self._check(raw, claims, access, time.time())

    def _check(self, raw: str, claims: dict[str, Any], access: AccessToken, now: float) -> TxnToken:
        skew = self.clock_skew
        if claims.get("aud") != self.trust_domain:
            raise bad_txn_token("aud is not this trust domain", "audience")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not _number(exp) or not _number(iat):
            raise bad_txn_token("exp and iat must be numeric dates", "malformed")
        if exp + skew <= now:  # type: ignore[operator]
            raise bad_txn_token("expired", "expired")
        if iat - skew > now:  # type: ignore[operator]
            raise bad_txn_token("issued in the future", "not_yet_valid")
        txn, sub, scope = claims.get("txn"), claims.get("sub"), claims.get("scope")
        if not _text(txn) or not _text(sub):
            raise bad_txn_token("txn and sub are required", "malformed")
        if not isinstance(scope, str) or not scope.split():
            raise bad_txn_token("scope is required", "malformed")
        own_txn = access.claims.get("txn")
        if isinstance(own_txn, str) and own_txn != txn:
            raise bad_txn_token("txn differs from the access token's txn", "txn_mismatch")
        if sub != access.subject:
            raise bad_txn_token("sub differs from the access token's sub", "sub_mismatch")
        if not set(scope.split()) <= access.scopes:
            raise bad_txn_token("scope exceeds the access token's scope", "scope")
        tctx, rctx = claims.get("tctx", {}), claims.get("rctx", {})
        if not isinstance(tctx, dict) or not isinstance(rctx, dict):
            raise bad_txn_token("tctx and rctx must be JSON objects", "malformed")
        if not _depth(tctx, MAX_CONTEXT_DEPTH) or not _depth(rctx, MAX_CONTEXT_DEPTH):
            raise bad_txn_token("tctx and rctx nest too deeply", "malformed")
        workloads = _workloads(claims)
        return TxnToken(
            raw,
            str(txn),
            str(sub),
            frozenset(scope.split()),
            tctx,
            rctx,
            workloads,
            int(exp),  # type: ignore[arg-type]
            claims,
        )
