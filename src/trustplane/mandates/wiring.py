"""How the mandate component plugs into the composition root (kept here so ``app.py`` changes by
a few lines only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trustplane import metrics
from trustplane.clients.service import ClientRegistry
from trustplane.keys.service import KeyService
from trustplane.mandates.events import NatsPublisher, SecurityEvents
from trustplane.mandates.service import GENERATION, MandateService
from trustplane.mandates.store import SqlMandateStore
from trustplane.rar.registry import AuthorizationDetailsRegistry, RegistryConfigError
from trustplane.settings import Settings, SettingsError
from trustplane.storage.db import Database

if TYPE_CHECKING:
    from fastapi import APIRouter

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


def refresh(mandates: MandateService, current: dict[str, int], seen: dict[str, int]) -> None:
    """Another process changed a mandate: drop cached mandate heads."""
    if current.get(GENERATION) != seen.get(GENERATION):
        mandates.invalidate()
        metrics.CACHE_RELOADS.labels(cache="mandates").inc()


def router(mandates: MandateService, guard: BearerGuard) -> APIRouter:
    """The management API, behind the one bearer guard."""
    from trustplane.mandates.http import mandates_router

    return mandates_router(mandates, guard)
