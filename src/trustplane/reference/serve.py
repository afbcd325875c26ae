"""Serving the reference services as a process: the app built from settings, around the PEP SDK.

``trustplane reference serve`` reads the services' store settings (:mod:`.settings`) and these,
all ``TRUSTPLANE_REFERENCE_*`` as well:

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
=============================================  ===============================================

With ``TRUSTPLANE_REFERENCE_NATS_URL`` the process also runs the outbox publisher (JetStream).
Every outbound call (JWKS, PDP, introspection) goes through one guarded ``OutboundFetcher``.
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
from trustplane.pep.http import Pep
from trustplane.reference.entitlement import IntrospectionMandateCheck, MandateCheck, MandateStatus
from trustplane.reference.events import EventSigner
from trustplane.reference.http import build_app
from trustplane.reference.jetstream import OutboxPublisher
from trustplane.reference.services import TradeServices
from trustplane.reference.settings import PREFIX, ReferenceSettings, ReferenceSettingsError
from trustplane.reference.store import TradeStore
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


class ProvenanceMandateCheck:
    """A token derived at a partner from a token resting on a mandate carries that mandate's
    reference in its provenance (``prv.mandate``: not one of the partner's own mandates, so it is
    not re-checked there), not in ``mandate``. The trade's mandate is then matched against the
    provenance's, and the partner's introspection still decides liveness: a partner revokes the
    tokens it derived from a revoked mandate (SSF, docs/ssf.md)."""

    def __init__(self, inner: MandateCheck) -> None:
        self._inner = inner

    async def check(
        self, token: str | None, claims: Mapping[str, Any], trade_envelope: Mapping[str, Any]
    ) -> MandateStatus:
        if not isinstance(claims.get("mandate"), dict):
            found = provenance_mandate(claims)
            if found is not None:
                claims = {**claims, "mandate": found}
        return await self._inner.check(token, claims, trade_envelope)


def provenance_mandate(claims: Mapping[str, Any], depth: int = 4) -> dict[str, Any] | None:
    """The first mandate reference down the ``prv`` chain (at most ``depth`` levels)."""
    node = claims.get("prv")
    for _ in range(depth):
        if not isinstance(node, dict):
            return None
        if isinstance(node.get("mandate"), dict):
            return dict(node["mandate"])
        node = node.get("prv")
    return None


def create_reference_app(settings: ServeSettings) -> FastAPI:
    """The reference services' app (docs/settlement.md): store, signer, PEP (token validation and
    the PDP), event-time entitlement by introspection, idempotency keys; the outbox publisher when
    NATS is configured. Nothing is opened before the app starts."""
    fetcher = OutboundFetcher(
        OutboundPolicy.development() if settings.allow_insecure_loopback else OutboundPolicy()
    )
    key = _client_key(settings.client_key_file)
    store_settings = settings.store
    store = TradeStore(
        Database(store_settings.database_url),
        EventSigner.from_file(store_settings.issuer, store_settings.event_key_file),
    )
    idempotency_store = SqlIdempotencyStore(store.db)
    introspection = PrivateKeyJwt(
        settings.introspection_client_id, key, "k1", settings.introspection
    )
    mandates = ProvenanceMandateCheck(
        IntrospectionMandateCheck(f"{settings.introspection}/introspect", introspection, fetcher)
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
    pep = Pep(PolicyEnforcer(validator, pdp, realm="reference"))
    app = build_app(TradeServices(store, mandates), pep, IdempotencyService(idempotency_store))
    app.router.lifespan_context = _lifespan(store, idempotency_store, store_settings, fetcher)
    return app


def _lifespan(
    store: TradeStore,
    idempotency: SqlIdempotencyStore,
    settings: ReferenceSettings,
    fetcher: OutboundFetcher,
) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.create_schema()
        await idempotency.create_schema()
        stop = asyncio.Event()
        publisher: OutboxPublisher | None = None
        task: asyncio.Task[None] | None = None
        if settings.nats_url is not None:
            publisher = OutboxPublisher(store, settings.nats_url, prefix=settings.nats_prefix)
            task = asyncio.create_task(publisher.run(stop))
        try:
            yield
        finally:
            stop.set()
            if task is not None and publisher is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5)
                await publisher.close()
            await fetcher.aclose()
            await store.db.dispose()

    return lifespan
