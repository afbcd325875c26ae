"""The deployment's services: :class:`Services` builds every component (``Services.build``) in start
order, and starts, refreshes, maintains and stops them as loops over them. The CLI and the tests build
the same object; :mod:`trustplane.app` mounts their routers and runs the loops in a server. Nothing
here imports the web framework, so that a CLI command that only needs the services does not pay for
FastAPI (docs/operations.md, "Start-up cost").

Each component is built by its package's ``wiring.py`` and has the shape of
:class:`trustplane.component.Component` (docs/architecture.md, "How to add a component")."""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from trustplane import expiry
from trustplane.audit import wiring as audit_wiring
from trustplane.audit.ledger import Ledger
from trustplane.audit.sink import write_events
from trustplane.authorize import wiring as authorize_wiring
from trustplane.authorize.dpop_par import dpop_at_par
from trustplane.bearer_guard import BearerGuard, RevokedTokens
from trustplane.bearer_guard import wiring as guard_wiring
from trustplane.clients import wiring as clients_wiring
from trustplane.clients.authentication import ClientAuthenticator
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.clients.service import ClientService
from trustplane.component import Component
from trustplane.console import wiring as console_wiring
from trustplane.federation import wiring as federation_wiring
from trustplane.federation.service import FederationService
from trustplane.keys import wiring as keys_wiring
from trustplane.keys.service import KeyService
from trustplane.mandates import wiring as mandates_wiring
from trustplane.mandates.service import MandateService
from trustplane.oauth import wiring as oauth_wiring
from trustplane.oauth.introspection import IntrospectionService
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.outbound import HostRateLimiter
from trustplane.policy import wiring as policy_wiring
from trustplane.policy.service import PolicyService
from trustplane.protocol import wiring as protocol_wiring
from trustplane.protocol.replay import RedisReplayCache, SqlReplayCache
from trustplane.protocol.scopes import Vocabulary, load_vocabulary, with_internal_apis
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.readiness import ReadinessProbe
from trustplane.security_events import wiring as security_events_wiring
from trustplane.settings import Settings
from trustplane.ssf import wiring as ssf_wiring
from trustplane.storage import generations
from trustplane.storage import wiring as storage_wiring
from trustplane.storage.db import Database
from trustplane.storage.migrate import pending
from trustplane.storage.writer import GroupCommitWriter
from trustplane.surveillance import wiring as surveillance_wiring
from trustplane.tls import CertificateSource
from trustplane.token_wiring import build_token_endpoint

log = structlog.get_logger("trustplane")


@dataclass
class Services:
    """Every component (``components``, in start order) and, by name, the services they hold that
    the HTTP layer, the CLI and the tests use; tests and the CLI build the same object."""

    settings: Settings
    db: Database
    writer: GroupCommitWriter
    vocabulary: Vocabulary
    keys: KeyService
    clients: ClientService
    replay: SqlReplayCache | RedisReplayCache
    sql_replay: SqlReplayCache
    remote_jwks: RemoteJwksCache
    authenticator: ClientAuthenticator
    token_endpoint: TokenEndpoint
    introspection: IntrospectionService
    federation: FederationService
    rar: AuthorizationDetailsRegistry
    mandates: MandateService
    authorization: authorize_wiring.Authorization
    ledger: Ledger
    policy: PolicyService
    revoked: RevokedTokens
    guard: BearerGuard
    #: Start order; closed in reverse. The writer is last: it starts when everything that writes
    #: through it is ready and closes first, so its queue is flushed before the ledger integrates.
    components: tuple[Component, ...]
    readiness: ReadinessProbe = field(init=False)

    def __post_init__(self) -> None:
        self.readiness = ReadinessProbe(self)

    @classmethod
    def build(cls, settings: Settings, db: Database | None = None) -> Services:
        db = db or Database(settings.effective_database_url)
        writer = GroupCommitWriter(db)
        vocabulary = console_wiring.vocabulary(
            settings, with_internal_apis(load_vocabulary(settings.scopes_file), settings.issuer)
        )
        kek = keys_wiring.key_encryption_key(settings)
        keys = keys_wiring.build(settings, db, kek, write_events)
        # one per-host rate limit for every fetch the server makes (trustplane.outbound)
        limiter = HostRateLimiter(settings.outbound_rate_per_host, settings.outbound_burst_per_host)
        clients = clients_wiring.build(settings, db, vocabulary, limiter, write_events)
        registry = clients.service.registry
        rar, mandate_service = mandates_wiring.build(settings, db, keys.service, registry)
        # the one guard of every bearer-protected route: it checks mandates, so it comes after them
        revocations = guard_wiring.build(settings, db, keys.service, registry, mandate_service)
        guard = revocations.guard
        mandates = mandates_wiring.Mandates(mandate_service, guard)
        policy = policy_wiring.build(settings, db, writer, guard)
        federation = federation_wiring.build(settings, db, vocabulary, limiter, guard, write_events)
        audit = audit_wiring.build(settings, db, writer, kek, guard, registry, clients.remote_jwks)
        replay = protocol_wiring.build(settings, db, writer)
        auth = ClientAuthenticator(settings, registry, replay.replay, clients.remote_jwks)
        # -- the token endpoint and its grants --------------------------------------------------
        authorization = authorize_wiring.build(
            settings, db, kek, registry, vocabulary, rar, mandate_service, audit.sink,
            revocations.revoked,
            authenticator=auth, replay=replay.replay, remote_jwks=clients.remote_jwks,  # PAR, JAR
        )  # fmt: skip
        introspection = IntrospectionService(
            settings, db, auth, keys.service, registry, revocations.revoked, audit.sink,
            mandate_service, refresh_tokens=authorization.revocations,
        )  # fmt: skip
        token = build_token_endpoint(
            settings=settings, db=db, writer=writer, keys=keys.service, vocabulary=vocabulary,
            audit=audit.sink, authenticator=auth, replay=replay.replay,
            engine=policy.service.engine, details=rar, mandates=mandate_service,
            clients=registry, partners=federation.service.registry,
            codes=authorization.codes, delegated=authorization.revocations,
            revocations=revocations.revoked, kek=kek,
        )  # fmt: skip
        if token.dpop is not None:  # RFC 9449 §10.1: a DPoP proof at /par binds the code
            authorization.http.par_checks.append(dpop_at_par(token.dpop, settings.issuer + "/par"))
        # ----------------------------------------------------------------------------------------
        metadata = oauth_wiring.metadata_json(
            settings, vocabulary, audit.ledger.loaded_verifier_key
        )
        # RFC 8705: client certificates from the connection or a trusted proxy (trustplane.tls)
        certificates = CertificateSource.from_settings(settings) if settings.mtls_enabled else None
        endpoints = oauth_wiring.Endpoints(
            token,
            introspection,
            keys.service,
            metadata,
            certificates,
            mtls_token_url=settings.mtls_base_url + "/token" if settings.mtls_base_url else None,
        )
        # shared signals: SETs on revocation, and partners' SETs revoking derived tokens
        ssf = ssf_wiring.build(
            settings, db, keys.service, revocations.revoked, federation.service.registry, guard,
            mandate_service.events,
        )  # fmt: skip
        # surveillance signals over the ledger (docs/surveillance.md)
        surveillance = surveillance_wiring.build(settings, db)
        components: tuple[Component, ...] = (
            keys,
            clients,
            audit,
            federation,
            mandates,
            authorization,
            policy,
            revocations,
            replay,
            endpoints,
            ssf,
            security_events_wiring.build(settings, db, keys.service, guard),
            surveillance,
            storage_wiring.Writer(writer),
        )
        return cls(
            settings=settings,
            db=db,
            writer=writer,
            vocabulary=vocabulary,
            keys=keys.service,
            clients=clients.service,
            replay=replay.replay,
            sql_replay=replay.sql,
            remote_jwks=clients.remote_jwks,
            authenticator=auth,
            token_endpoint=token,
            introspection=introspection,
            federation=federation.service,
            rar=rar,
            mandates=mandate_service,
            authorization=authorization,
            ledger=audit.ledger,
            policy=policy.service,
            revoked=revocations.revoked,
            guard=guard,
            components=components,
        )

    async def start(self) -> None:
        if await pending(self.db):
            raise RuntimeError("the database schema is not up to date: run `trustplane migrate`")
        for component in self.components:
            await component.start()
        await expiry.observe(self)  # the gauges of what expires soon (deploy/prometheus rules)

    async def stop(self) -> None:
        """Close every component in reverse start order (one failing does not keep the others
        open), then dispose of the database."""
        for component in reversed(self.components):
            try:
                await component.close()
            except Exception as exc:
                log.error("component_close_failed", component=component.name, error=repr(exc))
        await self.db.dispose()

    async def refresh_caches(self, seen: dict[str, int]) -> None:
        """Reload what another process changed: each component whose watched generation counters
        moved since ``seen``. A component whose reload fails keeps its old counters in ``seen``,
        so the next poll retries it."""
        async with self.db.read() as conn:
            current = await generations.read_all(conn)
        failed: set[str] = set()
        for component in self.components:
            if all(current.get(name) == seen.get(name) for name in component.watches):
                continue
            try:
                await component.reload()
            except Exception as exc:
                log.error("cache_reload_failed", component=component.name, error=repr(exc))
                failed.update(component.watches)
        kept = {name: seen[name] for name in failed if name in seen}
        seen.clear()
        seen.update({k: v for k, v in current.items() if k not in failed}, **kept)

    async def maintenance(self) -> None:
        """Every component's periodic upkeep (rotation, pruning, retries); one failing does not
        skip the others. Then the gauges of what expires soon (deploy/prometheus rules)."""
        for component in self.components:
            try:
                await component.maintain()
            except Exception as exc:
                log.error("maintenance_failed", component=component.name, error=repr(exc))
        await expiry.observe(self)
