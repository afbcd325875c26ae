"""The clients component: the registry the hot path reads, RFC 7591 registration, and the cache of
clients' ``jwks_uri`` key sets."""

from __future__ import annotations

from dataclasses import dataclass

from trustplane import metrics
from trustplane.clients.remote_jwks import RemoteJwksCache, client_jwks_cache
from trustplane.clients.service import GENERATION, AuditWriter, ClientService
from trustplane.clients.store import SqlClientStore, SqlInitialAccessTokenStore
from trustplane.component import Idle, Routes
from trustplane.outbound import HostRateLimiter
from trustplane.protocol.scopes import Vocabulary
from trustplane.settings import Settings
from trustplane.storage.db import Database


@dataclass
class Clients(Idle):
    """Loads every client into the registry at start and when the ``clients`` generation moves
    (``trustplane_active_clients`` follows); closes the key-set fetcher at the end."""

    service: ClientService
    remote_jwks: RemoteJwksCache
    issuer: str
    name = "clients"
    watches = (GENERATION,)

    def routes(self) -> Routes:
        from trustplane.clients.http import registration_router

        return Routes(api=[registration_router(self.service, self.issuer)])

    async def start(self) -> None:
        await self._load()

    async def reload(self) -> None:
        await self._load()
        metrics.CACHE_RELOADS.labels(cache=self.name).inc()

    async def _load(self) -> None:
        await self.service.load()
        metrics.ACTIVE_CLIENTS.set(len(self.service.registry))

    async def close(self) -> None:
        await self.remote_jwks.aclose()


def build(
    settings: Settings,
    db: Database,
    vocabulary: Vocabulary,
    limiter: HostRateLimiter,
    audit: AuditWriter,
) -> Clients:
    """``audit`` writes client events in the change's own transaction (``audit.sink.write_events``)."""
    service = ClientService(
        db, SqlClientStore(), SqlInitialAccessTokenStore(), settings, vocabulary, audit
    )
    return Clients(service, client_jwks_cache(settings, limiter), settings.issuer)
