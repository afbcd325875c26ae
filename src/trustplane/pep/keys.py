"""Signing keys of the trusted issuers: configured explicitly, fetched over HTTP, cached in memory.

Only issuers named in the configuration are ever contacted, through the guarded outbound fetcher
(:mod:`trustplane.outbound`: public addresses unless its policy is the development one, no redirects,
timeouts, a 64 KiB cap while reading). Each one's JWKS comes from its configured
``jwks_uri`` or, when that is left out, from the ``jwks_uri`` of that issuer's own RFC 8414 metadata
(whose ``issuer`` must equal the configured identifier, §3.3). Nothing in a token (``jku``, ``x5u``,
``iss`` of an unknown issuer) can make the PEP fetch anything.

Rotation: keys are refetched when the cache is older than ``ttl``, and on a ``kid`` that is not in the
cache, at most once per ``min_refetch`` seconds per issuer, so a flood of tokens with made-up kids
costs one request a minute, not one per token. A failed refetch keeps the keys already known.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import structlog

from trustplane.jose.jwk import JWKError, PublicKey, import_public_jwks
from trustplane.jose.jws import ALGORITHMS
from trustplane.outbound import OutboundError, OutboundFetcher
from trustplane.pep import metrics
from trustplane.settings import is_loopback_host

log = structlog.get_logger("trustplane.pep")
MAX_DOCUMENT_BYTES = 64 * 1024


class ConfigurationError(ValueError):
    """The PEP configuration is unusable; the message names the setting."""


class KeySourceError(Exception):
    """The issuer's metadata or JWKS could not be fetched or is unusable."""


def check_url(url: str, what: str, fetcher: OutboundFetcher | None = None) -> str:
    """https, or plain http on a loopback host (development and tests only); no fragment. With
    ``fetcher``: also a URL its policy would fetch (a loopback URL needs the development policy)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigurationError(f"{what} {url!r} is not a URL") from None
    if parts.fragment or not parts.hostname:
        raise ConfigurationError(f"{what} {url!r} must be an absolute URL without a fragment")
    if parts.scheme != "https" and not (
        parts.scheme == "http" and is_loopback_host(parts.hostname)
    ):
        raise ConfigurationError(f"{what} {url!r} must use https (http only on a loopback host)")
    problem = fetcher.url_problem(url) if fetcher is not None else None
    if problem is not None:
        raise ConfigurationError(
            f"{what} {url!r}: {problem} (a sandbox on this machine needs "
            "OutboundFetcher(OutboundPolicy.development()))"
        )
    return url


def metadata_url(issuer: str) -> str:
    """RFC 8414 §3.1: the well-known suffix goes between the host and the issuer's path."""
    parts = urlsplit(issuer)
    path = "/.well-known/oauth-authorization-server" + parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """One issuer whose access tokens the resource server accepts.

    ``issuer`` is compared to the token's ``iss`` exactly (no trailing-slash or case folding).
    ``jwks_uri`` None: discovered from the issuer's RFC 8414 metadata. ``algorithms``: the signature
    algorithms accepted from this issuer, a subset of ES256, EdDSA and PS256 (``none`` and the HMAC
    family cannot be configured: a resource server never holds an issuer's secret).
    """

    issuer: str
    jwks_uri: str | None = None
    algorithms: frozenset[str] = field(default_factory=lambda: frozenset(ALGORITHMS))

    def __post_init__(self) -> None:
        check_url(self.issuer, "issuer")
        if self.jwks_uri is not None:
            check_url(self.jwks_uri, "jwks_uri")
        bad = sorted(set(self.algorithms) - set(ALGORITHMS))
        if bad or not self.algorithms:
            raise ConfigurationError(
                f"issuer {self.issuer}: algorithms must be a non-empty subset of "
                f"{', '.join(ALGORITHMS)} (refused: {', '.join(bad) or 'empty'})"
            )


class IssuerKeys:
    """The cached key set of one trusted issuer: ``kid -> (alg, key)``, plus any kid-less keys."""

    def __init__(
        self,
        trusted: TrustedIssuer,
        fetcher: OutboundFetcher,
        *,
        ttl: float = 300.0,
        min_refetch: float = 30.0,
    ) -> None:
        self.trusted = trusted
        self._fetcher, self._ttl, self._min_refetch = fetcher, ttl, min_refetch
        self._by_kid: dict[str, tuple[str, PublicKey]] = {}
        self._unnamed: list[tuple[str, PublicKey]] = []
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._jwks_uri = trusted.jwks_uri
        self._lock = asyncio.Lock()

    async def candidates(self, kid: str | None, alg: str) -> list[PublicKey]:
        """The keys that may have signed a token with this ``kid`` and ``alg`` (usually one).

        Raises :class:`KeySourceError` while no key set has ever been fetched: that is our outage,
        not a bad token, and the caller fails closed with a 503 instead of blaming the client."""
        now = time.monotonic()
        if now - self._fetched_at > self._ttl or (kid is not None and kid not in self._by_kid):
            await self._refresh(now)
            if self._fetched_at == float("-inf"):
                raise KeySourceError(f"no keys of {self.trusted.issuer} could be fetched yet")
        if kid is not None:
            entry = self._by_kid.get(kid)
            return [entry[1]] if entry is not None and entry[0] == alg else []
        return [key for key_alg, key in self._unnamed if key_alg == alg]

    async def _refresh(self, now: float) -> None:
        async with self._lock:
            if now - self._attempted_at < self._min_refetch:
                return  # another task refreshed meanwhile, or the last attempt was too recent
            self._attempted_at = time.monotonic()
            try:
                keys = await self._fetch()
            except KeySourceError as exc:
                metrics.PEP_JWKS_FETCHES.labels(issuer=self.trusted.issuer, outcome="failed").inc()
                log.warning("pep_jwks_fetch_failed", issuer=self.trusted.issuer, error=str(exc))
                return
            metrics.PEP_JWKS_FETCHES.labels(issuer=self.trusted.issuer, outcome="ok").inc()
            allowed = self.trusted.algorithms
            self._by_kid = {k: (a, key) for k, a, key in keys if k is not None and a in allowed}
            self._unnamed = [(a, key) for k, a, key in keys if k is None and a in allowed]
            self._fetched_at = self._attempted_at

    async def _fetch(self) -> list[tuple[str | None, str, PublicKey]]:
        if self._jwks_uri is None:
            metadata = await self._get_json(metadata_url(self.trusted.issuer), "pep_metadata")
            if metadata.get("issuer") != self.trusted.issuer:
                raise KeySourceError("metadata issuer does not match the configured issuer")
            uri = metadata.get("jwks_uri")
            if not isinstance(uri, str):
                raise KeySourceError("metadata has no jwks_uri")
            try:
                self._jwks_uri = check_url(uri, "jwks_uri")
            except ConfigurationError as exc:
                raise KeySourceError(str(exc)) from None
        try:
            return import_public_jwks(await self._get_json(self._jwks_uri, "pep_jwks"))
        except JWKError as exc:
            raise KeySourceError(f"unusable JWKS: {exc}") from None

    async def _get_json(self, url: str, purpose: str) -> dict[str, object]:
        try:
            return await self._fetcher.get_json(url, purpose=purpose, max_bytes=MAX_DOCUMENT_BYTES)
        except OutboundError as exc:
            raise KeySourceError(f"GET {url}: {exc}") from None
