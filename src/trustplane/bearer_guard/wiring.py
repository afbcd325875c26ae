"""The revocations component: the in-memory revocation list and the one bearer guard that reads it
(with the key ring, the client registry and the mandates' liveness)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from trustplane import metrics
from trustplane.bearer_guard.guard import BearerGuard, MandateLiveness
from trustplane.bearer_guard.revoked import RevokedTokens
from trustplane.clients.service import ClientRegistry
from trustplane.component import Idle
from trustplane.keys.service import KeyService
from trustplane.protocol.revocations import GENERATION
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.tls import CertificateSource


@dataclass
class Revocations(Idle):
    """Reloads the list when the ``revocations`` generation moves (a revocation by any process);
    maintenance deletes revocations whose tokens have expired. The list itself loads on first use,
    so a guard never answers from a list it has not read."""

    revoked: RevokedTokens
    guard: BearerGuard
    db: Database
    name = "revocations"
    watches = (GENERATION,)

    async def reload(self) -> None:
        await self.revoked.load()
        metrics.CACHE_RELOADS.labels(cache=self.name).inc()

    async def maintain(self) -> None:
        async with self.db.transaction() as conn:
            await self.revoked.prune(conn, int(time.time()))


def build(
    settings: Settings,
    db: Database,
    keys: KeyService,
    clients: ClientRegistry,
    mandates: MandateLiveness,
) -> Revocations:
    revoked = RevokedTokens(db)  # the SQL store, plus the list the guard reads
    guard = BearerGuard(
        issuer=settings.issuer,
        clock_skew=settings.clock_skew,
        keys=keys,
        clients=clients,
        revoked=revoked,
        mandates=mandates,
        certificates=CertificateSource.from_settings(settings),
    )
    return Revocations(revoked, guard, db)
