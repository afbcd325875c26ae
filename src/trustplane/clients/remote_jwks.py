"""Keys of clients registered with a ``jwks_uri`` (registration-time metadata, never a token header).

Fetched over https (no redirects, 5 s timeout, 64 KiB cap), cached for ``ttl`` seconds, refetched on an
unknown ``kid`` at most once per ``min_refetch`` seconds per URI so a flood of bogus kids cannot turn
us into a traffic amplifier.
"""

from __future__ import annotations

import time

import httpx
import orjson
import structlog

from trustplane.jose.jwk import JWKError, PublicKey, import_public_jwks

log = structlog.get_logger("trustplane.clients")
MAX_JWKS_BYTES = 64 * 1024
KeyList = list[tuple[str | None, str, PublicKey]]


class RemoteJwksCache:
    def __init__(
        self,
        *,
        ttl: float = 300.0,
        min_refetch: float = 60.0,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._ttl, self._min_refetch = ttl, min_refetch
        self._http = httpx.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport)
        self._cache: dict[str, tuple[float, KeyList]] = {}

    async def keys(self, uri: str, kid: str | None) -> KeyList:
        now = time.monotonic()
        cached = self._cache.get(uri)
        if cached is not None:
            fetched_at, keys = cached
            fresh = now - fetched_at < self._ttl
            known = kid is None or any(k == kid for k, _, _ in keys)
            if (fresh and known) or now - fetched_at < self._min_refetch:
                return keys
        keys = await self._fetch(uri)
        self._cache[uri] = (now, keys)
        return keys

    async def _fetch(self, uri: str) -> KeyList:
        try:
            response = await self._http.get(uri, headers={"Accept": "application/json"})
            if response.status_code != 200 or len(response.content) > MAX_JWKS_BYTES:
                raise JWKError(f"jwks_uri answered {response.status_code}")
            return import_public_jwks(orjson.loads(response.content))
        except (httpx.HTTPError, orjson.JSONDecodeError, JWKError) as exc:
            log.warning("jwks_uri_fetch_failed", uri=uri, error=str(exc))
            return []

    async def aclose(self) -> None:
        await self._http.aclose()
