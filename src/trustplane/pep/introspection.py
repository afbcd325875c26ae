"""Refusing revoked tokens: RFC 7662 introspection at the token's issuer, with a small cache.

A JWT access token verifies locally until it expires, even after its client revoked it (RFC 7009) or
was disabled. When the resource server cannot accept that window, it configures introspection: each
token is then also checked with its issuer, which answers ``{"active": false}`` for revoked tokens.

The trade-off, made explicit by ``ttl``: an ``active`` answer is reused for ``ttl`` seconds (default
10 s), so a revocation takes effect within ``ttl`` seconds instead of immediately, and the issuer sees
one introspection per token per ``ttl`` instead of one per request. An ``inactive`` answer is final
and kept until the token expires. If the issuer cannot be asked, the request fails closed.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import structlog

from trustplane.outbound import OutboundError, OutboundFetcher
from trustplane.pep import metrics
from trustplane.pep.client_auth import ClientAuth
from trustplane.pep.keys import check_url
from trustplane.tracing.spans import inject_headers

log = structlog.get_logger("trustplane.pep")
MAX_CACHED = 50_000


class IntrospectionUnavailable(Exception):
    """The introspection endpoint could not give an answer (network, status, body)."""


class RevocationCheck:
    """Asks ``endpoint`` whether a token is still active, authenticated as ``auth``'s client (which the
    issuer must allow to introspect tokens for this resource server's audience)."""

    def __init__(
        self,
        endpoint: str,
        auth: ClientAuth,
        fetcher: OutboundFetcher,
        *,
        ttl: float = 10.0,
        max_cached: int = MAX_CACHED,
    ) -> None:
        self.endpoint = check_url(endpoint, "introspection endpoint", fetcher)
        self._auth, self._fetcher, self._ttl, self._max = auth, fetcher, ttl, max_cached
        self._cache: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    async def is_active(self, token: str, key: str, exp: int) -> bool:
        """``key`` names the token in the cache (issuer and ``jti`` of a verified token)."""
        now = time.time()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            metrics.PEP_INTROSPECTIONS.labels(outcome="cached").inc()
            return cached[0]
        active = await self._ask(token)
        until = float(exp) if not active else min(now + self._ttl, float(exp))
        self._cache[key] = (active, until)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return active

    async def _ask(self, token: str) -> bool:
        form = {"token": token, "token_type_hint": "access_token"}
        headers = {"Accept": "application/json"}
        self._auth.apply(form, headers)
        inject_headers(headers)  # W3C traceparent of the caller's span, if any
        try:
            response = await self._fetcher.request(
                "POST", self.endpoint, purpose="pep_introspection", data=form, headers=headers
            )
            body = response.json() if response.status == 200 else None
        except OutboundError as exc:
            body, error = None, f"{exc.outcome}: {exc}"
        else:
            error = f"status {response.status}"
        if not isinstance(body, dict) or not isinstance(body.get("active"), bool):
            metrics.PEP_INTROSPECTIONS.labels(outcome="failed").inc()
            log.warning("pep_introspection_failed", endpoint=self.endpoint, error=error)
            raise IntrospectionUnavailable(error)
        metrics.PEP_INTROSPECTIONS.labels(outcome=str(body["active"]).lower()).inc()
        return bool(body["active"])
