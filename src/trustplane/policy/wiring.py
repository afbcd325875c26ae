"""The policy component: the engine with the active bundle, the AuthZEN decision API (a hot path),
the bundle simulation admin API, and the retention of recorded decision inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trustplane import metrics
from trustplane.component import Idle, Routes
from trustplane.policy.service import GENERATION, PolicyService, build_policy
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.storage.writer import GroupCommitWriter

if TYPE_CHECKING:
    from trustplane.bearer_guard import BearerGuard


@dataclass
class Policy(Idle):
    """Activates the built-in bundle on a new deployment and loads the active one at start; reloads
    when the ``policy`` generation moves (an activation or rollback anywhere); maintenance prunes
    decision inputs past their retention."""

    service: PolicyService
    settings: Settings
    guard: BearerGuard
    name = "policy"
    watches = (GENERATION,)

    def routes(self) -> Routes:
        from trustplane.policy.admin_http import simulation_router
        from trustplane.policy.http import AuthzenHttp

        return Routes(
            api=[simulation_router(self.service, self.guard, self.settings)],
            fast=AuthzenHttp(self.service.engine, self.guard).routes(),
        )

    async def start(self) -> None:
        await self.service.ensure_default()
        await self.service.load()

    async def reload(self) -> None:
        await self.service.load()
        metrics.CACHE_RELOADS.labels(cache=self.name).inc()

    async def maintain(self) -> None:
        await self.service.prune()


def build(
    settings: Settings, db: Database, writer: GroupCommitWriter, guard: BearerGuard
) -> Policy:
    return Policy(build_policy(settings, db, writer), settings, guard)
