"""The federation component: trusted partners (trust profiles), their registry and its key-set
cache, and the partner admin API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trustplane import metrics
from trustplane.clients.remote_jwks import partner_jwks_cache
from trustplane.component import Idle, Routes
from trustplane.federation.service import GENERATION, AuditWriter, FederationService
from trustplane.federation.store import SqlPartnerStore
from trustplane.outbound import HostRateLimiter
from trustplane.protocol.scopes import Vocabulary
from trustplane.settings import Settings
from trustplane.storage.db import Database

if TYPE_CHECKING:
    from trustplane.bearer_guard import BearerGuard


@dataclass
class Federation(Idle):
    """Loads every partner's current profile at start and when the ``partners`` generation moves
    (``trustplane_partners`` follows, set by the service); closes the partners' key-set fetcher."""

    service: FederationService
    guard: BearerGuard
    name = "partners"
    watches = (GENERATION,)

    def routes(self) -> Routes:
        from trustplane.federation.http import federation_router

        return Routes(api=[federation_router(self.service, self.guard)])

    async def start(self) -> None:
        await self.service.load()

    async def reload(self) -> None:
        await self.service.load()
        metrics.CACHE_RELOADS.labels(cache=self.name).inc()

    async def close(self) -> None:
        await self.service.registry.aclose()


def build(
    settings: Settings,
    db: Database,
    vocabulary: Vocabulary,
    limiter: HostRateLimiter,
    guard: BearerGuard,
    audit: AuditWriter,
) -> Federation:
    """The partners' key sets have their own cache (only ``federation_jwks_hosts``, own intervals)
    and share the one per-host rate limit of outbound fetches. ``audit`` writes partner events in
    the change's own transaction (``audit.sink.write_events``)."""
    jwks = partner_jwks_cache(settings, limiter)
    service = FederationService(db, SqlPartnerStore(), settings, vocabulary, audit, jwks)
    return Federation(service, guard)
