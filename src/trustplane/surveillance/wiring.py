"""The surveillance component: the detector's background loop over the ledger (every process runs
it; one round at a time wins the claim) and the pruning of old windows."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from trustplane.component import Idle
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.surveillance.service import Surveillance
from trustplane.surveillance.store import SqlSurveillanceStore


@dataclass
class SurveillanceComponent(Idle):
    """Disabled (``surveillance_enabled = false``): nothing runs; alerts already in the ledger stay
    there and the console still shows them."""

    service: Surveillance
    enabled: bool
    name = "surveillance"

    async def start(self) -> None:
        if self.enabled:
            await self.service.start()

    async def run(self, stopping: asyncio.Event) -> None:
        if self.enabled:
            await self.service.run(stopping)

    async def maintain(self) -> None:
        if self.enabled:
            await self.service.prune()


def build(settings: Settings, db: Database) -> SurveillanceComponent:
    service = Surveillance(settings, db, SqlSurveillanceStore())
    return SurveillanceComponent(service, settings.surveillance_enabled)
