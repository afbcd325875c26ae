"""The composition root: ``create_app(settings)`` wires stores, services and routers. Nothing here
runs at import time; every engine, key and client is created inside the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from trustplane import __version__, metrics
from trustplane.audit.http import audit_router
from trustplane.audit.ledger import Ledger
from trustplane.audit.sink import SqlAuditSink, write_events
from trustplane.authorize import wiring as authorize_wiring
from trustplane.bearer_guard import BearerGuard, RevokedTokens
from trustplane.clients.http import registration_router
from trustplane.clients.remote_jwks import (
    RemoteJwksCache,
    client_jwks_cache,
    partner_jwks_cache,
)
from trustplane.clients.service import GENERATION as CLIENTS_GENERATION
from trustplane.clients.service import ClientService
from trustplane.clients.store import SqlClientStore, SqlInitialAccessTokenStore
from trustplane.federation.http import federation_router
from trustplane.federation.service import GENERATION as PARTNERS_GENERATION
from trustplane.federation.service import FederationService
from trustplane.federation.store import SqlPartnerStore
from trustplane.keys.crypto import decode_kek, load_or_create_kek_file
from trustplane.keys.service import GENERATION as KEYS_GENERATION
from trustplane.keys.service import KeyService
from trustplane.keys.store import SqlKeyStore
from trustplane.limits import BoundedRequests, RefusalHook, RequestLimits, request_limits
from trustplane.logging import configure_logging
from trustplane.mandates import wiring as mandates_wiring
from trustplane.mandates.service import MandateService
from trustplane.oauth.client_auth import ClientAuthenticator
from trustplane.oauth.discovery import server_metadata
from trustplane.oauth.http import OAuthHttp
from trustplane.oauth.introspection import IntrospectionService
from trustplane.oauth.openapi import protocol_paths
from trustplane.oauth.replay import RedisReplayCache, SqlReplayCache
from trustplane.oauth.revocations import GENERATION as REVOCATIONS_GENERATION
from trustplane.oauth.revocations import SqlRevocationStore
from trustplane.oauth.scopes import Vocabulary, load_vocabulary, with_internal_apis
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.oauth.wiring import build_token_endpoint
from trustplane.outbound import HostRateLimiter
from trustplane.policy.admin_http import simulation_router
from trustplane.policy.http import AuthzenHttp, authzen_paths
from trustplane.policy.service import GENERATION as POLICY_GENERATION
from trustplane.policy.service import PolicyService, build_policy
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.readiness import ReadinessProbe
from trustplane.settings import Settings, SettingsError
from trustplane.site.http import docs_routes, index_route
from trustplane.storage import generations
from trustplane.storage.db import Database
from trustplane.storage.migrate import pending
from trustplane.storage.writer import GroupCommitWriter

log = structlog.get_logger("trustplane")
MAINTENANCE_INTERVAL = 60.0


def partner_jwks(settings: Settings, limiter: HostRateLimiter | None = None) -> RemoteJwksCache:
    """The cache of partners' ``jwks_uri`` key sets (separate from clients': its own intervals)."""
    return partner_jwks_cache(settings, limiter)


def key_encryption_key(settings: Settings) -> bytes:
    """The KEK from settings; on the embedded default only, a generated file in the data directory."""
    if settings.key_encryption_key is not None:
        return decode_kek(settings.key_encryption_key.get_secret_value())
    if not settings.is_embedded:
        raise SettingsError(
            "invalid setting TRUSTPLANE_KEY_ENCRYPTION_KEY: required when the database is not the "
            "embedded SQLite file (generate one with `trustplane keys new-kek`)"
        )
    return load_or_create_kek_file(settings.data_dir)


@dataclass
class Services:
    """Everything the app holds; tests and the CLI build the same object."""

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
    readiness: ReadinessProbe = field(init=False)

    def __post_init__(self) -> None:
        self.readiness = ReadinessProbe(self)

    @classmethod
    def build(cls, settings: Settings, db: Database | None = None) -> Services:
        db = db or Database(settings.effective_database_url)
        writer = GroupCommitWriter(db)
        vocabulary = with_internal_apis(load_vocabulary(settings.scopes_file), settings.issuer)
        audit = SqlAuditSink(writer)
        sql_replay = SqlReplayCache(writer, db)
        replay: SqlReplayCache | RedisReplayCache = (
            RedisReplayCache(settings.redis_url) if settings.redis_url else sql_replay
        )
        kek = key_encryption_key(settings)
        keys = KeyService(db, SqlKeyStore(), settings, kek, write_events)
        clients = ClientService(
            db, SqlClientStore(), SqlInitialAccessTokenStore(), settings, vocabulary, write_events
        )
        # one per-host rate limit for every fetch the server makes (trustplane.outbound)
        limiter = HostRateLimiter(settings.outbound_rate_per_host, settings.outbound_burst_per_host)
        remote = client_jwks_cache(settings, limiter)
        auth = ClientAuthenticator(settings, clients.registry, replay, remote)
        policy = build_policy(settings, db, writer)
        rar, mandates = mandates_wiring.build(settings, db, keys, clients.registry)
        revoked = RevokedTokens(db)  # the SQL store, plus the list the bearer guard reads
        authorization = authorize_wiring.build(
            settings, db, kek, clients.registry, vocabulary, rar, mandates, audit
        )
        introspection = IntrospectionService(
            settings, db, auth, keys, clients.registry, revoked, audit, mandates,
            refresh_tokens=authorization.revocations,
        )  # fmt: skip
        federation = FederationService(
            db,
            SqlPartnerStore(),
            settings,
            vocabulary,
            write_events,
            partner_jwks(settings, limiter),
        )
        token = build_token_endpoint(
            settings=settings, db=db, writer=writer, keys=keys, vocabulary=vocabulary,
            audit=audit, authenticator=auth, replay=replay, engine=policy.engine, details=rar,
            mandates=mandates, clients=clients.registry, partners=federation.registry,
            codes=authorization.codes, delegated=authorization.revocations,
        )  # fmt: skip
        return cls(
            settings,
            db,
            writer,
            vocabulary,
            keys,
            clients,
            replay,
            sql_replay,
            remote,
            auth,
            token,
            introspection,
            federation,
            rar,
            mandates,
            authorization,
            Ledger(settings, db, kek),
            policy,
            revoked,
        )

    async def start(self) -> None:
        if await pending(self.db):
            raise RuntimeError("the database schema is not up to date: run `trustplane migrate`")
        self.writer.start()
        await self.keys.ensure()
        await self.ledger.start()
        await self.keys.load()
        await self.clients.load()
        metrics.ACTIVE_CLIENTS.set(len(self.clients.registry))
        await self.federation.load()
        await self.policy.ensure_default()
        await self.policy.load()

    async def stop(self) -> None:
        await self.writer.stop()
        await self.mandates.events.aclose()
        # integrate what is pending; if that fails it stays durable and the next start integrates it
        with contextlib.suppress(Exception):
            await self.ledger.integrate_all()
        await self.remote_jwks.aclose()
        await self.federation.registry.aclose()
        if isinstance(self.replay, RedisReplayCache):
            await self.replay.aclose()
        await self.db.dispose()

    async def refresh_caches(self, seen: dict[str, int]) -> None:
        """Reload what another process changed (generation counters moved)."""
        async with self.db.read() as conn:
            current = await generations.read_all(conn)
        if current.get(KEYS_GENERATION) != seen.get(KEYS_GENERATION):
            await self.keys.load()
            metrics.CACHE_RELOADS.labels(cache="keys").inc()
        if current.get(CLIENTS_GENERATION) != seen.get(CLIENTS_GENERATION):
            await self.clients.load()
            metrics.ACTIVE_CLIENTS.set(len(self.clients.registry))
            metrics.CACHE_RELOADS.labels(cache="clients").inc()
        if current.get(PARTNERS_GENERATION) != seen.get(PARTNERS_GENERATION):
            await self.federation.load()
            metrics.CACHE_RELOADS.labels(cache="partners").inc()
        mandates_wiring.refresh(self.mandates, current, seen)
        if current.get(REVOCATIONS_GENERATION) != seen.get(REVOCATIONS_GENERATION):
            await self.revoked.load()
            metrics.CACHE_RELOADS.labels(cache="revocations").inc()
        if current.get(POLICY_GENERATION) != seen.get(POLICY_GENERATION):
            await self.policy.load()
            metrics.CACHE_RELOADS.labels(cache="policy").inc()
        seen.clear()
        seen.update(current)

    async def maintenance(self) -> None:
        """Scheduled key rotation, removal of expired retired keys, pruning of expired jtis."""
        await self.keys.maybe_rotate()
        await self.keys.prune()
        await self.sql_replay.prune()
        await self.mandates.notify_expired()
        await self.mandates.publish_events()
        await self.authorization.prune()
        await self.ledger.purge()
        await self.policy.prune()
        async with self.db.transaction() as conn:
            await SqlRevocationStore().prune(conn, int(time.time()))


async def _every(interval: float, fn: Any, name: str) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await fn()
        except Exception as exc:  # keep the loop alive; the failure is logged and retried
            log.error("background_task_failed", task=name, error=repr(exc))


class TrustplaneApp:
    """The ASGI entry point. Every HTTP request first passes the size limits (``trustplane.limits``:
    header count and size 431, body 413 by ``Content-Length`` before reading or while streaming).
    Then the protocol hot paths (token, introspection, revocation, JWKS, metadata) go straight to
    their handlers; everything else (registration, admin APIs) goes through FastAPI.

    FastAPI's middleware stack costs about as much per request as verifying the client assertion, so
    the hot paths skip it; their handlers catch their own errors (``oauth.http.protocol_endpoint``).
    """

    def __init__(
        self,
        api: FastAPI,
        fast_routes: list[Route],
        limits: RequestLimits | None = None,
        hooks: Mapping[str, RefusalHook] | None = None,
    ) -> None:
        self.api = api
        self.router = api.router
        self.state = api.state
        self._fast = {
            (route.path, method): _asgi(route.endpoint)
            for route in fast_routes
            for method in (route.methods or ())
        }
        self._bounded = BoundedRequests(self._dispatch, limits or RequestLimits(), hooks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._bounded(scope, receive, send)
            return
        await self.api(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._fast.get((scope["path"], scope["method"]))
        if handler is not None:
            await handler(scope, receive, send)
            return
        await self.api(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        return self.api.openapi()


def _asgi(endpoint: Any) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = await endpoint(Request(scope, receive))
        await response(scope, receive, send)

    return app


def create_app(settings: Settings, *, services: Services | None = None) -> TrustplaneApp:
    configure_logging(settings.log_level, settings.log_format)
    svc = services or Services.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        seen: dict[str, int] = {}
        await svc.refresh_caches(seen)
        tasks = [
            asyncio.create_task(
                _every(settings.cache_refresh_interval, lambda: svc.refresh_caches(seen), "cache")
            ),
            asyncio.create_task(_every(MAINTENANCE_INTERVAL, svc.maintenance, "maintenance")),
            asyncio.create_task(svc.ledger.run()),
        ]
        log.info("trustplane_started", issuer=settings.issuer, version=__version__)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await svc.stop()

    app = FastAPI(
        title="trustplane",
        version=__version__,
        lifespan=lifespan,
        # the OpenAPI document and its UI are operations endpoints: ``create_ops_app`` serves them
        docs_url=None,
        openapi_url=None,
        redoc_url=None,
    )
    app.state.services = svc
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # a token request refused at the entry is audited like one refused by the endpoint
    hooks = {"/token": svc.token_endpoint.refuse_unparsed}
    return TrustplaneApp(app, _mount(app, svc), request_limits(settings), hooks)


def _mount(app: FastAPI, svc: Services) -> list[Route]:
    """Add every route to FastAPI (one routing table, 405s, docs); return the hot-path ones."""
    protocol = OAuthHttp(svc.token_endpoint, svc.introspection, svc.keys, _metadata_json(svc))
    guard = bearer_guard(svc)  # every bearer-protected route of ours goes through this one
    app.include_router(registration_router(svc.clients, svc.settings.issuer))
    app.include_router(audit_router(svc.ledger, guard, svc.settings, svc.db))
    app.include_router(federation_router(svc.federation, guard))
    app.include_router(mandates_wiring.router(svc.mandates, guard))
    app.router.routes.extend(svc.authorization.http.routes())
    app.include_router(simulation_router(svc.policy, guard, svc.settings))
    fast = protocol.routes()
    fast += AuthzenHttp(svc.policy.engine, guard).routes()
    app.router.routes.extend(fast)
    app.router.routes.append(Route("/healthz", _health, methods=["GET"]))
    app.router.routes.append(Route("/readyz", _ready, methods=["GET"]))
    # the docs are on the operations listener (``create_ops_app``): the public index does not link them
    app.router.routes.append(index_route(svc.settings, docs_url=None))
    return fast


def bearer_guard(svc: Services) -> BearerGuard:
    """The one guard of our bearer-protected routes (docs/architecture.md)."""
    return BearerGuard(
        issuer=svc.settings.issuer,
        clock_skew=svc.settings.clock_skew,
        keys=svc.keys,
        clients=svc.clients.registry,
        revoked=svc.revoked,
        mandates=svc.mandates,
    )


def _metadata_json(svc: Services) -> Callable[[], bytes]:
    """RFC 8414 metadata, built once the audit log's key is known (it is created on first start)."""
    built: list[bytes] = []

    def metadata() -> bytes:
        if not built:
            key = svc.ledger.loaded_verifier_key()
            body = orjson.dumps(server_metadata(svc.settings, svc.vocabulary, key))
            if key is None:
                return body
            built.append(body)
        return built[0]

    return metadata


def create_ops_app(services: Services, openapi: Callable[[], dict[str, Any]]) -> ASGIApp:
    """The operations listener's app (``TRUSTPLANE_OPS_HOST``/``TRUSTPLANE_OPS_PORT``): metrics,
    liveness, readiness and the OpenAPI document of the public app with its UI. It has no lifespan
    of its own: the public app's lifespan starts and stops the shared services."""

    async def openapi_json(_request: Request) -> Response:
        return Response(orjson.dumps(openapi()), media_type="application/json")

    app = Starlette(
        routes=[
            Route("/metrics", _metrics, methods=["GET"]),
            Route("/healthz", _health, methods=["GET"]),
            Route("/readyz", _ready, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            *docs_routes("trustplane"),
        ]
    )
    app.state.services = services
    return BoundedRequests(app, request_limits(services.settings))


async def _metrics(_request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _health(request: Request) -> Response:
    """Liveness: the process answers (and has its signing key, or says it is still starting)."""
    svc: Services = request.app.state.services
    ready = svc.keys.ring.signer is not None
    return Response(
        orjson.dumps({"status": "ok" if ready else "starting"}),
        200 if ready else 503,
        media_type="application/json",
    )


async def _ready(request: Request) -> Response:
    """Readiness (``trustplane.readiness``): 200 when every check passes, else 503."""
    svc: Services = request.app.state.services
    readiness = await svc.readiness.evaluate()
    return Response(
        orjson.dumps(readiness.body()),
        200 if readiness.ready else 503,
        headers={"Cache-Control": "no-store"},
        media_type="application/json",
    )


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema.setdefault("paths", {}).update(protocol_paths())
        schema["paths"].update(authzen_paths())
        app.openapi_schema = schema
    return app.openapi_schema


def create_app_from_env() -> TrustplaneApp:
    """uvicorn factory for multi-worker runs: settings come from the environment."""
    from trustplane.settings import load_settings

    return create_app(load_settings())
