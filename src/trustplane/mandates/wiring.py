"""The mandates component: mandates and their cached heads, the RAR type registry, the security
event stream (SETs, optionally to NATS), and the management API.

Built in two steps because the one bearer guard checks mandates: :func:`build` makes the service,
the composition root makes the guard with it, then :class:`Mandates` gets both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trustplane import metrics
from trustplane.clients.service import ClientRegistry
from trustplane.component import Idle, Routes
from trustplane.keys.service import KeyService
from trustplane.mandates.events import NatsPublisher, SecurityEvents
from trustplane.mandates.service import GENERATION, MandateService
from trustplane.mandates.store import SqlMandateStore
from trustplane.rar.registry import AuthorizationDetailsRegistry, RegistryConfigError
from trustplane.settings import Settings, SettingsError
from trustplane.storage.db import Database

if TYPE_CHECKING:
    from trustplane.bearer_guard import BearerGuard


def build(
    settings: Settings, db: Database, keys: KeyService, clients: ClientRegistry
) -> tuple[AuthorizationDetailsRegistry, MandateService]:
    try:
        registry = AuthorizationDetailsRegistry.load(settings.authorization_details_types_dir)
    except RegistryConfigError as exc:
        raise SettingsError(
            f"invalid setting TRUSTPLANE_AUTHORIZATION_DETAILS_TYPES_DIR: {exc}"
        ) from None
    publisher = (
        NatsPublisher(settings.nats_url, settings.nats_stream, settings.nats_subject)
        if settings.nats_url
        else None
    )
    events = SecurityEvents(settings, keys, publisher)
    return registry, MandateService(db, SqlMandateStore(), settings, registry, clients, events)


@dataclass
class Mandates(Idle):
    """Drops cached mandate heads when the ``mandates`` generation moves; maintenance notifies
    expired mandates and retries undelivered security events; closes the event publisher."""

    service: MandateService
    guard: BearerGuard
    name = "mandates"
    watches = (GENERATION,)

    def routes(self) -> Routes:
        from trustplane.mandates.http import mandates_router

        return Routes(api=[mandates_router(self.service, self.guard)])

    async def reload(self) -> None:
        self.service.invalidate()
        metrics.CACHE_RELOADS.labels(cache=self.name).inc()

    async def maintain(self) -> None:
        await self.service.notify_expired()
        await self.service.publish_events()

    async def close(self) -> None:
        await self.service.events.aclose()
