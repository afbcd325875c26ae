"""Keys of clients (and partners) registered with a ``jwks_uri`` (registration-time metadata, never a
token header).

Fetched through the guarded outbound fetcher (:mod:`trustplane.outbound`: public addresses only,
https, no redirects, timeouts, a 64 KiB cap enforced while reading, a per-host rate limit), cached for
``ttl`` seconds, refetched on an unknown ``kid`` at most once per ``min_refetch`` seconds per URI so a
flood of bogus kids cannot turn us into a traffic amplifier (a failed fetch too).

A fetch that fails or is refused (network error, timeout, a status other than 200, not JSON, not a
JWK Set) keeps the last good keys: they were valid, and an outage of the client's or partner's key
server must not refuse every one of its assertions. For at most ``max_stale`` seconds after their
last good fetch (``jwks_max_stale``, default a day): a key its owner revoked by taking it off a key
server that stays down must not verify for ever. Past that, a failed fetch gives no keys
(``invalid_client``) and logs ``jwks_uri_keys_expired`` until a fetch succeeds. A successful fetch replaces the set whole, so a
key the owner dropped is gone. A set with private key members gives no keys (the owner published
its private key: its signatures prove nothing). With no good fetch yet, a failure gives no keys and
the assertion fails ``invalid_client``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import structlog

from trustplane.jose.jwk import JWKError, PublicKey, has_private_members, import_public_jwks
from trustplane.jose.jws import ParsedJWS
from trustplane.outbound import HostRateLimiter, OutboundError, OutboundFetcher, OutboundPolicy
from trustplane.settings import Settings

log = structlog.get_logger("trustplane.clients")
MAX_JWKS_BYTES = 64 * 1024
#: One registered key: its ``kid`` (if any), its JWS algorithm, the key.
KeyEntry = tuple[str | None, str, PublicKey]
KeyList = list[KeyEntry]


@dataclass(frozen=True, slots=True)
class _Cached:
    """The last good key set of one URI, when it was fetched, and when a fetch was last tried."""

    keys: KeyList
    fetched_at: float
    tried_at: float


class RemoteJwksCache:
    """``purpose`` labels the fetches (``client_jwks``, ``partner_jwks``). ``transport`` (tests
    only): a fetcher with the default policy over that transport instead of the network."""

    def __init__(
        self,
        fetcher: OutboundFetcher | None = None,
        *,
        purpose: str = "client_jwks",
        ttl: float = 300.0,
        min_refetch: float = 60.0,
        max_stale: float = 86400.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._ttl, self._min_refetch, self._purpose = ttl, min_refetch, purpose
        self._max_stale = max_stale
        policy = OutboundPolicy(max_bytes=MAX_JWKS_BYTES)
        self._fetcher = fetcher or OutboundFetcher(policy, transport=transport)
        self._cache: dict[str, _Cached] = {}

    async def keys(self, uri: str, kid: str | None) -> KeyList:
        now = time.monotonic()
        cached = self._cache.get(uri)
        if cached is not None:
            fresh = now - cached.fetched_at < self._ttl
            known = kid is None or any(k == kid for k, _, _ in cached.keys)
            if (fresh and known) or now - cached.tried_at < self._min_refetch:
                return cached.keys
        fetched = await self._fetch(uri)
        if fetched is None:  # keep the last good keys a while; try again after min_refetch
            kept = cached.keys if cached else []
            fetched_at = cached.fetched_at if cached else -math.inf
            if kept and now - fetched_at > self._max_stale:
                log.warning(
                    "jwks_uri_keys_expired", uri=uri, age_s=round(now - fetched_at), keys=len(kept)
                )
                kept = []
            self._cache[uri] = _Cached(kept, fetched_at, now)
            return kept
        self._cache[uri] = _Cached(fetched, now, now)
        return fetched

    async def _fetch(self, uri: str) -> KeyList | None:
        """The key set at ``uri``; None if the fetch failed or the answer is not a JWK Set."""
        try:
            jwks = await self._fetcher.get_json(
                uri, purpose=self._purpose, max_bytes=MAX_JWKS_BYTES
            )
        except OutboundError as exc:
            log.warning("jwks_uri_fetch_failed", uri=uri, error=str(exc))
            return None
        if _exposes_private_keys(jwks):
            log.warning("jwks_uri_private_keys", uri=uri)
            return []
        try:
            return import_public_jwks(jwks)
        except JWKError as exc:
            log.warning("jwks_uri_fetch_failed", uri=uri, error=str(exc))
            return None

    async def aclose(self) -> None:
        await self._fetcher.aclose()


def _exposes_private_keys(jwks: object) -> bool:
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    return isinstance(keys, list) and any(
        isinstance(jwk, dict) and has_private_members(jwk) for jwk in keys
    )


async def signed_with(
    jws: ParsedJWS, keys: Sequence[KeyEntry], jwks_uri: str | None, remote: RemoteJwksCache
) -> tuple[bool, str | None, int]:
    """Whether ``jws`` verifies with one of a client's registered keys: its ``jwks`` (``keys``), or
    its ``jwks_uri`` through ``remote`` (an unknown ``kid`` refetches, rate-limited). Only keys of
    the JWS's algorithm, and of its ``kid`` when it names one, are tried. Also returns the ``kid``
    and how many keys were tried, for the caller's log line. Client assertions and request objects
    are both checked through here."""
    kid = jws.header.get("kid")
    kid = kid if isinstance(kid, str) else None
    if jwks_uri:
        keys = await remote.keys(jwks_uri, kid)
    candidates = [key for k, alg, key in keys if alg == jws.alg and (kid is None or k == kid)]
    return any(jws.verify(key) for key in candidates), kid, len(candidates)


def client_jwks_cache(
    settings: Settings, limiter: HostRateLimiter | None = None
) -> RemoteJwksCache:
    """Clients' ``jwks_uri`` key sets: any public host; loopback only with
    ``allow_insecure_loopback_jwks_uri`` (development)."""
    policy = OutboundPolicy.from_settings(
        settings, allow_loopback=settings.allow_insecure_loopback_jwks_uri, max_bytes=MAX_JWKS_BYTES
    )
    fetcher = OutboundFetcher(policy, rate_limiter=limiter)
    return RemoteJwksCache(fetcher, purpose="client_jwks", max_stale=settings.jwks_max_stale)


def partner_jwks_cache(
    settings: Settings, limiter: HostRateLimiter | None = None
) -> RemoteJwksCache:
    """Partners' ``jwks_uri`` key sets: only hosts in ``federation_jwks_hosts``; loopback only with
    ``federation_allow_insecure_loopback`` (development). Its own cache intervals."""
    policy = OutboundPolicy.from_settings(
        settings,
        allow_loopback=settings.federation_allow_insecure_loopback,
        allowed_hosts=frozenset(h.lower() for h in settings.federation_jwks_hosts),
        max_bytes=MAX_JWKS_BYTES,
    )
    return RemoteJwksCache(
        OutboundFetcher(policy, rate_limiter=limiter),
        purpose="partner_jwks",
        ttl=settings.federation_jwks_ttl,
        min_refetch=settings.federation_jwks_min_refetch,
        max_stale=settings.jwks_max_stale,
    )
