"""The security events component: ``GET /events`` and, when ``events_nats_url`` is set, the
JetStream publisher as this process's background loop (every process runs it; one publishes at a
time: :mod:`trustplane.security_events.publisher`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trustplane.component import Idle, Routes
from trustplane.events.jetstream import JetStreamPublisher
from trustplane.keys.service import KeyService
from trustplane.security_events.publisher import LedgerOutbox, stream
from trustplane.security_events.stream import SecurityEvents
from trustplane.settings import Settings
from trustplane.storage.db import Database

if TYPE_CHECKING:
    from trustplane.bearer_guard import BearerGuard


@dataclass
class SecurityEventsComponent(Idle):
    events: SecurityEvents
    guard: BearerGuard
    publisher: JetStreamPublisher | None
    name = "security_events"

    def routes(self) -> Routes:
        from trustplane.security_events.http import events_router

        return Routes(api=[events_router(self.events, self.guard)])

    async def run(self, stopping: asyncio.Event) -> None:
        if self.publisher is not None:
            await self.publisher.run(stopping)

    async def close(self) -> None:
        if self.publisher is not None:
            await self.publisher.close()


def build(
    settings: Settings, db: Database, keys: KeyService, guard: BearerGuard
) -> SecurityEventsComponent:
    events = SecurityEvents(db, keys, issuer=settings.issuer, origin=settings.audit_origin)
    publisher = None
    if settings.events_nats_url:
        prefix = settings.events_subject_prefix
        outbox = LedgerOutbox(db, events, prefix=prefix)
        publisher = JetStreamPublisher(
            outbox,
            settings.events_nats_url,
            [stream(prefix)],
            batch=settings.events_publish_batch,
            name="security_events",
        )
    return SecurityEventsComponent(events, guard, publisher)
