"""The composition root: ``create_app(settings)`` wires the components and their routers. Nothing
here runs at import time; every engine, key and client is created inside the app's lifespan.

Each component is built by its package's ``wiring.py`` and has the shape of
:class:`trustplane.component.Component`; this module only orders them and runs a few loops over
them (docs/architecture.md, "How to add a component"). :class:`~trustplane.services.Services`, which
builds them, lives in :mod:`trustplane.services` (no FastAPI there, for the CLI) and is re-exported
here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trustplane import __version__, metrics
from trustplane.bearer_guard import BearerGuard
from trustplane.console import wiring as console_wiring
from trustplane.keys import wiring as keys_wiring
from trustplane.limits import (
    DECLARED_BODY,
    BoundedRequests,
    RefusalHook,
    RequestLimits,
    request_limits,
)
from trustplane.logging import configure_logging
from trustplane.oauth import http as oauth_http
from trustplane.oauth.openapi import protocol_paths
from trustplane.policy.http import authzen_paths
from trustplane.services import (
    Services as Services,
)  # re-exported: tests and scripts import it here
from trustplane.settings import Settings
from trustplane.site.http import docs_routes, index_route
from trustplane.storage import notify
from trustplane.tracing import otlp_endpoint

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

log = structlog.get_logger("trustplane")
MAINTENANCE_INTERVAL = 60.0
#: How long shutdown waits for a background round in progress before cancelling it.
SHUTDOWN_GRACE = 10.0


async def _every(
    interval: float, fn: Callable[[], Awaitable[None]], name: str, stopping: asyncio.Event
) -> None:
    """Call ``fn`` every ``interval`` seconds until ``stopping`` is set (a call in progress
    finishes: it is not cancelled inside a transaction)."""
    while not await _stopped_within(stopping, interval):
        try:
            await fn()
        except Exception as exc:  # keep the loop alive; the failure is logged and retried
            log.error("background_task_failed", task=name, error=repr(exc))


async def _stopped_within(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds``; True as soon as ``stopping`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
    return stopping.is_set()


async def _stop_tasks(tasks: list[asyncio.Task[None]], stopping: asyncio.Event) -> None:
    """Let each background task finish its round; cancel what overstays the grace period."""
    stopping.set()
    _done, late = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
    for task in late:
        log.warning("background_task_cancelled", task=task.get_name())
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class TrustplaneApp:
    """The ASGI entry point. Every HTTP request first passes the size limits (``trustplane.limits``:
    header count and size 431, body 413 by ``Content-Length`` before reading or while streaming).
    Then the protocol hot paths (token, introspection, revocation, JWKS, metadata) go straight to
    their handlers; everything else (registration, admin APIs) goes through FastAPI.

    FastAPI's middleware stack costs about as much per request as verifying the client assertion, so
    the hot paths skip it; their handlers catch their own errors (``protocol.responses.protocol_endpoint``).
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
        self._entry: ASGIApp = self._bounded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._entry(scope, receive, send)
            return
        await self.api(scope, receive, send)

    def trace(self, tracer: Any) -> None:
        """A server span around every HTTP request (``trustplane.tracing``; only when it is on)."""
        from trustplane.tracing.spans import TracingMiddleware

        self._entry = TracingMiddleware(self._bounded, tracer, {path for path, _ in self._fast})

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._fast.get((scope["path"], scope["method"]))
        if handler is not None:
            await handler(scope, receive, send)
            return
        await self.api(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        return self.api.openapi()


def _asgi(endpoint: Callable[[Request], Awaitable[ASGIApp]]) -> ASGIApp:
    """A hot-path endpoint as an ASGI app. A body the entry found declared within its cap
    (``limits.DECLARED_BODY``) is read here with one ``receive`` when the server has it whole, and
    handed over as the request's body: Starlette's ``Request.body`` would read the same message
    through an async generator and ``aclosing`` on every request. Anything else (no declared length,
    a body still arriving, a disconnect) is left to the handler's own reads, the message already
    received handed back first."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request: Request
        if scope.get(DECLARED_BODY):
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                request = _ReadRequest(scope, receive, message.get("body", b""))
            else:
                request = Request(scope, _replaying(message, receive))
        else:
            request = Request(scope, receive)
        response = await endpoint(request)
        await response(scope, receive, send)

    return app


class _ReadRequest(Request):
    """A request whose body was received whole before its handler ran: ``body()`` and ``stream()``
    answer it without another ``receive`` (Starlette's own cache of the body, filled in)."""

    def __init__(self, scope: Scope, receive: Receive, body: bytes) -> None:
        super().__init__(scope, receive)
        self._body = body
        self._stream_consumed = True


def _replaying(first: Message, receive: Receive) -> Receive:
    """``receive`` that answers ``first`` once before the server's next messages."""
    held: list[Message] = [first]

    async def replay() -> Message:
        return held.pop() if held else await receive()

    return replay


def create_app(
    settings: Settings,
    *,
    services: Services | None = None,
    span_processor: SpanProcessor | None = None,
) -> TrustplaneApp:
    """``span_processor``: tracing on with spans going there (tests), whatever is configured."""
    traced = span_processor is not None or otlp_endpoint(settings) is not None
    configure_logging(settings.log_level, settings.log_format, trace_ids=traced)
    svc = services or Services.build(settings)
    tracer_provider = None
    if traced:
        from trustplane.tracing.spans import provider

        tracer_provider = provider(settings, span_processor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        if app.state.console is not None:  # the console's built-in client, registered if missing
            await app.state.console.ensure_client()
        seen: dict[str, int] = {}
        await svc.refresh_caches(seen)
        stopping = asyncio.Event()

        async def refresh() -> None:
            await svc.refresh_caches(seen)

        # pushed invalidation on PostgreSQL (LISTEN/NOTIFY), the poll as fallback: storage/notify.py
        listener = notify.listener_for(svc.db)
        wake = listener.changed if listener is not None else None
        connected = listener.connected if listener is not None else None
        tasks = [
            asyncio.create_task(
                notify.refresh_loop(
                    settings.cache_refresh_interval, refresh, stopping, wake, connected
                ),
                name="cache",
            ),
            *(
                [asyncio.create_task(listener.run(stopping), name="cache-listener")]
                if listener
                else []
            ),
            asyncio.create_task(
                _every(MAINTENANCE_INTERVAL, svc.maintenance, "maintenance", stopping),
                name="maintenance",
            ),
            *(asyncio.create_task(c.run(stopping), name=c.name) for c in svc.components),
        ]
        log.info("trustplane_started", issuer=settings.issuer, version=__version__)
        try:
            yield
        finally:
            await _stop_tasks(tasks, stopping)
            await svc.stop()
            if tracer_provider is not None:  # export what is batched
                await asyncio.to_thread(tracer_provider.shutdown)

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
    # unknown paths and wrong methods in the protocol's error shape, not FastAPI's {"detail"}
    app.add_exception_handler(HTTPException, oauth_http.routing_error)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # a token request refused at the entry is audited like one refused by the endpoint
    hooks = {"/token": svc.token_endpoint.refuse_unparsed}
    entry = TrustplaneApp(app, _mount(app, svc), request_limits(settings), hooks)
    if tracer_provider is not None:
        entry.trace(tracer_provider.get_tracer("trustplane", __version__))
    return entry


def _mount(app: FastAPI, svc: Services) -> list[Route]:
    """Add every component's routes to FastAPI (one routing table, 405s, docs); return the hot-path
    ones, which ``TrustplaneApp`` serves without FastAPI's middleware."""
    fast: list[Route] = []
    for component in svc.components:
        routes = component.routes()
        for route in routes.api:
            if isinstance(route, APIRouter):
                app.include_router(route)
            else:
                app.router.routes.append(route)
        fast += routes.fast
    # the operator console (docs/console.md), when TRUSTPLANE_CONSOLE_LEI is set
    app.state.console = console_wiring.build(svc, keys_wiring.key_encryption_key(svc.settings))
    if app.state.console is not None:
        app.router.routes.extend(app.state.console.routes())
    app.router.routes.extend(fast)
    app.router.routes.append(Route("/healthz", _health, methods=["GET"]))
    app.router.routes.append(Route("/readyz", _ready, methods=["GET"]))
    # the docs are on the operations listener (``create_ops_app``): the public index does not link them
    app.router.routes.append(index_route(svc.settings, docs_url=None))
    return fast


def bearer_guard(svc: Services) -> BearerGuard:
    """The one guard of our bearer-protected routes (docs/architecture.md)."""
    return svc.guard


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
    """Every worker's counters added up when there are several (``trustplane.metrics``)."""
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)


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
