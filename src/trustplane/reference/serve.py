"""Serving the reference services as a process: the app built from settings, around the PEP SDK.

``trustplane reference serve`` reads the services' store settings (:mod:`.settings`: one store per
service) and these, all ``TRUSTPLANE_REFERENCE_*`` as well:

=============================================  ===============================================
``TRUSTPLANE_REFERENCE_AUDIENCE``              the services' audience (RFC 8707 resource); required
``TRUSTPLANE_REFERENCE_TRUSTED_ISSUERS``       issuers whose tokens are accepted (space or comma
                                               separated); required
``TRUSTPLANE_REFERENCE_PDP``                   the issuer whose AuthZEN PDP decides; required
``TRUSTPLANE_REFERENCE_PDP_CLIENT_ID``         our client there (scope ``decision:evaluate``)
``TRUSTPLANE_REFERENCE_INTROSPECTION``         the issuer asked about the mandate at settlement
                                               (RFC 7662; default: the PDP's issuer)
``TRUSTPLANE_REFERENCE_INTROSPECTION_CLIENT_ID``  our client there (``--resource-server`` for the
                                               audience; default: the PDP client)
``TRUSTPLANE_REFERENCE_CLIENT_KEY_FILE``       the ES256 private key (PEM) of both clients
                                               (private_key_jwt, ``kid`` ``k1``)
``TRUSTPLANE_REFERENCE_ALLOW_INSECURE_LOOPBACK``  ``true``: the guarded fetcher may reach loopback
                                               issuers over http (development and the demo only)
``TRUSTPLANE_REFERENCE_<SERVICE>_DATABASE_URL``  each service's own store (``EXECUTION``,
                                               ``ALLOCATION``, ``SETTLEMENT``, ``REPORTING``;
                                               default ``.trustplane/reference-<service>.db``,
                                               beside ``TRUSTPLANE_REFERENCE_DATABASE_URL``'s
                                               SQLite file; :mod:`.settings`)
``TRUSTPLANE_REFERENCE_<SERVICE>_EVENT_KEY_FILE``  each owner's event key (default
                                               ``EVENT_KEY_FILE``'s name with ``-<service>``)
``TRUSTPLANE_REFERENCE_SERVICES``              the services whose events this process hands off
                                               and publishes (default all four)
=============================================  ===============================================

The process serves every route; each route acts on its owner's store, and the embedded dispatcher
(:mod:`.handoff`) hands the owners' events (of ``SERVICES``) to the other stores before the call
returns, and sweeps every 0.25 s. With ``TRUSTPLANE_REFERENCE_NATS_URL`` the process also runs
an outbox publisher (JetStream) per owner it runs, woken by that owner's commits (and, on
PostgreSQL, by the outbox's notifications: :mod:`.jetstream`), reading every second besides.
Every outbound call (JWKS, PDP, introspection) goes through one guarded ``OutboundFetcher``. The
PEP takes bearer and DPoP-bound tokens (RFC 9449; proof ``jti``s remembered per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from fastapi import FastAPI

from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import (
    AuthzenClient,
    IdempotencyService,
    PolicyEnforcer,
    PrivateKeyJwt,
    SqlIdempotencyStore,
    TokenValidator,
    TrustedIssuer,
)
from trustplane.pep.dpop import DpopBinding
from trustplane.pep.http import Pep
from trustplane.reference import machine
from trustplane.reference.entitlement import IntrospectionMandateCheck
from trustplane.reference.events import EventSigner
from trustplane.reference.handoff import Dispatcher, Upstream
from trustplane.reference.http import build_app
from trustplane.reference.jetstream import OutboxPublisher
from trustplane.reference.services import ServiceStores, TradeServices
from trustplane.reference.settings import PREFIX, ReferenceSettings, ReferenceSettingsError
from trustplane.reference.store import TradeStore, create_safely
from trustplane.storage.db import Database

_LIST = re.compile(r"[\s,]+")


@dataclass(frozen=True)
class ServeSettings:
    """What a serving process needs beyond the store: who it trusts and whom it asks."""

    store: ReferenceSettings
    audience: str
    trusted_issuers: tuple[str, ...]
    pdp: str
    pdp_client_id: str
    introspection: str
    introspection_client_id: str
    client_key_file: Path
    allow_insecure_loopback: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeSettings:
        env = os.environ if environ is None else environ

        def get(name: str, default: str | None = None) -> str:
            value = (env.get(PREFIX + name) or "").strip() or default
            if value is None:
                raise ReferenceSettingsError(f"{PREFIX}{name} is required to serve")
            return value

        pdp = get("PDP")
        pdp_client = get("PDP_CLIENT_ID")
        issuers = tuple(i for i in _LIST.split(get("TRUSTED_ISSUERS")) if i)
        return cls(
            store=ReferenceSettings.from_env(env),
            audience=get("AUDIENCE"),
            trusted_issuers=issuers,
            pdp=pdp,
            pdp_client_id=pdp_client,
            introspection=get("INTROSPECTION", pdp),
            introspection_client_id=get("INTROSPECTION_CLIENT_ID", pdp_client),
            client_key_file=Path(get("CLIENT_KEY_FILE")),
            allow_insecure_loopback=get("ALLOW_INSECURE_LOOPBACK", "false").lower() == "true",
        )


def _client_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ReferenceSettingsError(f"{PREFIX}CLIENT_KEY_FILE must hold an EC (P-256) key")
    return key


def open_stores(settings: ReferenceSettings) -> ServiceStores:
    """Each service's own store (docs/settlement.md, "Stores"): its database
    (:meth:`ReferenceSettings.database_url_of`) and, for the owners, its event key. Nothing is
    connected before first use."""
    stores: dict[str, TradeStore] = {}
    for service in machine.SERVICES:
        signer = (
            EventSigner.from_file(settings.issuer, settings.event_key_file_of(service))
            if service in machine.OWNERS
            else None
        )
        db = Database(settings.database_url_of(service))
        stores[service] = TradeStore(db, signer, service=service)
    return ServiceStores(**stores)


def dispatcher_of(stores: ServiceStores, served: tuple[str, ...]) -> Dispatcher:
    """The embedded hand-off from the owners this process runs (``served``) to every store that
    learns from them, each event verified with its owner's key and the deployment's issuer."""
    upstreams = [
        Upstream(service, store, store.signer.issuer, store.signer.jwks())
        for service, store in stores.by_service().items()
        if service in machine.OWNERS and service in served
    ]
    return Dispatcher.between(stores.by_service(), upstreams)


async def create_schemas(stores: ServiceStores) -> None:
    """Every store's tables and its Idempotency-Key table (safe when processes start at once)."""
    for store in stores.distinct():
        await store.create_schema()
        await create_safely(SqlIdempotencyStore(store.db).create_schema)


async def dispose(stores: ServiceStores) -> None:
    for store in stores.distinct():
        await store.db.dispose()


def create_reference_app(settings: ServeSettings) -> FastAPI:
    """The reference services' app (docs/settlement.md): each service's store and event key, the
    embedded hand-off between them, PEP (token validation and the PDP), event-time entitlement by
    introspection, idempotency keys in each route's owner's store; the outbox publishers when NATS
    is configured. Nothing is opened before the app starts."""
    fetcher = OutboundFetcher(
        OutboundPolicy.development() if settings.allow_insecure_loopback else OutboundPolicy()
    )
    key = _client_key(settings.client_key_file)
    store_settings = settings.store
    stores = open_stores(store_settings)
    handoff = dispatcher_of(stores, store_settings.services)
    introspection = PrivateKeyJwt(
        settings.introspection_client_id, key, "k1", settings.introspection
    )
    mandates = IntrospectionMandateCheck(
        f"{settings.introspection}/introspect", introspection, fetcher
    )
    validator = TokenValidator(
        audience=settings.audience,
        issuers=[TrustedIssuer(issuer) for issuer in settings.trusted_issuers],
        fetcher=fetcher,
    )
    pdp = AuthzenClient(
        settings.pdp,
        token_endpoint=f"{settings.pdp}/token",
        auth=PrivateKeyJwt(settings.pdp_client_id, key, "k1", settings.pdp),
        fetcher=fetcher,
    )
    # DPoP-bound tokens (RFC 9449; a partner's default binding) are accepted with a proof of their
    # key; proof jtis are remembered by this process for the proof's 60 s window
    pep = Pep(PolicyEnforcer(validator, pdp, realm="reference", dpop=DpopBinding()))
    idempotency = {
        service: IdempotencyService(SqlIdempotencyStore(store.db))
        for service, store in stores.by_service().items()
        if service in machine.OWNERS
    }
    services = TradeServices(stores, mandates, handoff=handoff)
    app = build_app(services, pep, idempotency)
    app.router.lifespan_context = _lifespan(services, handoff, store_settings, fetcher)
    return app


def _lifespan(
    services: TradeServices,
    handoff: Dispatcher,
    settings: ReferenceSettings,
    fetcher: OutboundFetcher,
) -> Any:
    stores = services.stores

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await create_schemas(stores)
        stop = asyncio.Event()
        publishers: list[OutboxPublisher] = []
        tasks = [asyncio.create_task(handoff.run(stop))]
        if settings.nats_url is not None:
            wakes: dict[str, asyncio.Event] = {}  # each owner's publisher, woken by its commits
            services.on_commit.append(lambda owner: wakes[owner].set() if owner in wakes else None)
            for service, store in stores.by_service().items():
                if service in machine.OWNERS and service in settings.services:
                    publisher = OutboxPublisher(
                        store, settings.nats_url, prefix=settings.nats_prefix
                    )
                    publishers.append(publisher)
                    wakes[service] = asyncio.Event()
                    tasks.append(asyncio.create_task(publisher.run(stop, wake=wakes[service])))
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5)
            for publisher in publishers:
                await publisher.close()
            await fetcher.aclose()
            await dispose(stores)

    return lifespan
