"""The OpenTelemetry side of :mod:`trustplane.tracing` (imported only when tracing is on, or by the
PEP SDK): the server span middleware, the tracer provider, the log processor, the audit correlation
and the outbound header injection."""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trustplane import __version__
from trustplane.tracing import otlp_endpoint

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    from trustplane.settings import Settings

_W3C = TraceContextTextMapPropagator()
_PROPAGATED = (b"traceparent", b"tracestate")


def provider(settings: Settings, processor: SpanProcessor | None = None) -> TracerProvider | None:
    """The tracer provider of this process: spans batched to the OTLP endpoint, or to ``processor``
    (tests: an in-memory exporter). None when tracing is off and no processor is given."""
    endpoint = otlp_endpoint(settings)
    if processor is None and endpoint is None:
        return None
    # the SDK is imported only when tracing is on (the API alone is enough for everything else)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
    from trustplane import audit_events as events

    events.CORRELATION = current_trace_id  # from now on audit events carry the trace id
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or "trustplane",
            "service.version": __version__,
        }
    )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(processor)
    return tracer_provider


class TracingMiddleware:
    """Plain ASGI: one ``SERVER`` span per HTTP request, named ``METHOD route`` (the route template
    when the router set one, the path for the fixed ``fixed_paths``, else the method alone, so span
    names never carry identifiers), with the HTTP semantic-convention attributes."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer, fixed_paths: Iterable[str]) -> None:
        self.app, self.tracer, self.fixed = app, tracer, frozenset(fixed_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _PROPAGATED
        }
        method = scope["method"]
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        with self.tracer.start_as_current_span(
            method,
            context=_W3C.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
            record_exception=True,
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                span.update_name(f"{method} {self._route(scope)}".rstrip())
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        span.set_status(Status(StatusCode.ERROR))

    def _route(self, scope: Scope) -> str:
        route = getattr(scope.get("route"), "path", None)
        if isinstance(route, str):
            return route
        path: str = scope["path"]
        return path if path in self.fixed else ""


def add_trace_ids(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: ``trace_id`` and ``span_id`` of the current span, if there is one."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", trace.format_trace_id(context.trace_id))
        event_dict.setdefault("span_id", trace.format_span_id(context.span_id))
    return event_dict


def current_trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def inject_headers(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Add ``traceparent`` (and ``tracestate``, baggage: the configured propagators) for the
    current span to outgoing request headers; nothing when no span is current."""
    from opentelemetry import propagate  # loads the configured propagators: on first use only

    propagate.inject(headers)
    return headers
