"""OpenTelemetry traces (``trustplane.tracing``): a server span per request continuing an incoming W3C
``traceparent``, the trace id in log lines and as the audit entry's correlation id, ``traceparent`` on
the PEP SDK's outbound calls, nothing installed when tracing is off; and a real server exporting to a
real OTLP/HTTP receiver (protobuf POSTs to /v1/traces)."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import _Started, make_settings, wait_until
from tests.e2e.conftest import LiveServers, running_servers
from trustplane import audit_events as events
from trustplane.app import Services, TrustplaneApp, create_app
from trustplane.audit.sink import recent_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.authzen.model import Entity
from trustplane.pep import AuthzenClient, ClientSecretBasic, OutboundFetcher
from trustplane.pep.introspection import RevocationCheck
from trustplane.settings import SettingsError, load_settings
from trustplane.storage.db import Database
from trustplane.tracing import otlp_endpoint
from trustplane.tracing.spans import add_trace_ids, current_trace_id

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(
    services: Services, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, TrustplaneApp]]:
    """The full app with tracing on, its spans going to ``exporter``."""
    monkeypatch.setattr(events, "CORRELATION", None)  # turned on below, back off after the test
    app = create_app(
        services.settings,
        services=_Started(services),  # type: ignore[arg-type]
        span_processor=SimpleSpanProcessor(exporter),
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url=services.settings.issuer) as client,
    ):
        yield client, app


def _refused_token(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> Any:
    return client.post("/token", data={"grant_type": "client_credentials"}, headers=headers or {})


# --------------------------------------------------------------------------- server spans


async def test_a_request_with_traceparent_continues_the_callers_trace(
    traced: tuple[httpx.AsyncClient, TrustplaneApp], exporter: InMemorySpanExporter
) -> None:
    client, _app = traced
    response = await _refused_token(client, {"traceparent": TRACEPARENT})
    assert response.status_code == 401
    (span,) = exporter.get_finished_spans()
    assert span.name == "POST /token"
    assert span.kind == trace.SpanKind.SERVER
    assert trace.format_trace_id(span.context.trace_id) == TRACE_ID
    assert span.parent is not None
    assert trace.format_span_id(span.parent.span_id) == PARENT_ID
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "POST"
    assert span.attributes["http.response.status_code"] == 401


@pytest.mark.parametrize(
    "header",
    [
        None,
        "garbage",
        f"00-{'0' * 32}-{PARENT_ID}-01",  # an all-zero trace id is invalid (W3C §3.2.2.3)
        f"00-{TRACE_ID}-{'0' * 16}-01",  # so is an all-zero parent id
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
    ],
)
async def test_without_a_valid_traceparent_a_new_trace_starts(
    traced: tuple[httpx.AsyncClient, TrustplaneApp],
    exporter: InMemorySpanExporter,
    header: str | None,
) -> None:
    client, _app = traced
    response = await _refused_token(client, {"traceparent": header} if header else None)
    assert response.status_code == 401  # served all the same
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert trace.format_trace_id(span.context.trace_id) != TRACE_ID


async def test_span_names_carry_routes_not_identifiers(
    traced: tuple[httpx.AsyncClient, TrustplaneApp], exporter: InMemorySpanExporter
) -> None:
    client, _app = traced
    await client.get("/jwks")
    await client.get("/mandates/m-123456")  # bearer-protected: 401, routed by FastAPI
    await client.get("/no/such/path/abc")
    names = [span.name for span in exporter.get_finished_spans()]
    assert names[0] == "GET /jwks"
    assert names[1] == "GET /mandates/{mandate_id}"
    assert names[2] == "GET"


async def test_a_refusal_at_the_entry_has_its_span(
    traced: tuple[httpx.AsyncClient, TrustplaneApp], exporter: InMemorySpanExporter
) -> None:
    client, _app = traced
    big = {"grant_type": "client_credentials", "x": "a" * (70 * 1024)}
    response = await client.post("/token", data=big, headers={"traceparent": TRACEPARENT})
    assert response.status_code == 413
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 413
    assert trace.format_trace_id(span.context.trace_id) == TRACE_ID


async def test_the_audit_entry_carries_the_trace_id_as_correlation_id(
    traced: tuple[httpx.AsyncClient, TrustplaneApp], services: Services
) -> None:
    client, _app = traced
    await _refused_token(client, {"traceparent": TRACEPARENT})
    refused = await _wait_for_event(services, AuditEventType.TOKEN_REFUSED.value)
    assert refused["correlation_id"] == TRACE_ID


async def _wait_for_event(services: Services, type_: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = await recent_events(services.db, 10, type_)
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {type_} event")


def test_a_callers_correlation_id_wins_over_the_trace_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "CORRELATION", current_trace_id)  # as tracing on does
    tracer = TracerProvider().get_tracer("t")
    assert AuditEvent(AuditEventType.TOKEN_ISSUED, "https://as").correlation_id is None  # no span
    with tracer.start_as_current_span("s") as span:
        trace_id = trace.format_trace_id(span.get_span_context().trace_id)
        own = AuditEvent(AuditEventType.TOKEN_ISSUED, "https://as", correlation_id="req-1")
        explicit_none = AuditEvent(AuditEventType.TOKEN_ISSUED, "https://as", correlation_id=None)
        bare = AuditEvent(AuditEventType.TOKEN_ISSUED, "https://as")
    assert own.correlation_id == "req-1"
    assert explicit_none.correlation_id == trace_id
    assert bare.correlation_id == trace_id


def test_off_events_get_no_correlation_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "CORRELATION", None)
    with TracerProvider().get_tracer("t").start_as_current_span("s"):
        assert AuditEvent(AuditEventType.TOKEN_ISSUED, "https://as").correlation_id is None


def test_log_lines_carry_the_current_trace_and_span() -> None:
    tracer = TracerProvider().get_tracer("t")
    assert add_trace_ids(None, "info", {"event": "x"}) == {"event": "x"}
    with tracer.start_as_current_span("s") as span:
        context = span.get_span_context()
        line = add_trace_ids(None, "info", {"event": "x"})
    assert line["trace_id"] == trace.format_trace_id(context.trace_id)
    assert line["span_id"] == trace.format_span_id(context.span_id)


# --------------------------------------------------------------------------- tracing off


async def test_off_nothing_is_installed(services: Services) -> None:
    app = create_app(services.settings, services=_Started(services))  # type: ignore[arg-type]
    assert app._entry is app._bounded  # the request path is the untraced one


@pytest.mark.parametrize(
    ("setting", "env", "expected"),
    [
        ("", {}, None),
        ("http://collector:4318", {}, "http://collector:4318/v1/traces"),
        ("http://collector:4318/", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, "http://collector:4318/v1/traces"),
        ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        ("", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/t", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, "http://c/t"),
        ("http://collector:4318", {"OTEL_SDK_DISABLED": "true"}, None),
    ],
)  # fmt: skip
def test_where_spans_go(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    env: dict[str, str],
    expected: str | None,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = make_settings("sqlite://", tmp_path, otel_exporter_otlp_endpoint=setting)
    assert otlp_endpoint(settings) == expected


@pytest.mark.parametrize("value", ["collector:4318", "ftp://c", "http://", "http://c/x?y=1"])
def test_a_malformed_endpoint_names_its_setting(value: str) -> None:
    with pytest.raises(
        SettingsError, match=r"^invalid setting TRUSTPLANE_OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        load_settings(otel_exporter_otlp_endpoint=value)


# --------------------------------------------------------------------------- the PEP SDK


def _recording(seen: list[httpx.Request]) -> OutboundFetcher:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/token":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 300})
        if request.url.path == "/introspect":
            return httpx.Response(200, json={"active": True})
        return httpx.Response(200, json={"decision": True, "context": {"decision_id": "d"}})

    return OutboundFetcher(transport=httpx.MockTransport(handler))


async def test_the_pep_sdk_sends_traceparent_on_every_call() -> None:
    seen: list[httpx.Request] = []
    fetcher = _recording(seen)
    pdp = AuthzenClient(
        "https://pdp.example",
        token_endpoint="https://as.example/token",
        auth=ClientSecretBasic("rs", "s"),
        fetcher=fetcher,
    )
    check = RevocationCheck("https://as.example/introspect", ClientSecretBasic("rs", "s"), fetcher)
    tracer = TracerProvider().get_tracer("service")
    with tracer.start_as_current_span("handle order") as span:
        context = span.get_span_context()
        await pdp.decide(Entity("Client", "c"), "order:create", Entity("Order", "o"), {})
        await check.is_active("token", "k", int(time.time()) + 60)
    assert [r.url.path for r in seen] == ["/token", "/access/v1/evaluation", "/introspect"]
    for request in seen:
        version, trace_id, parent_id, flags = request.headers["traceparent"].split("-")
        assert version == "00"
        assert int(flags, 16) & 1  # sampled (0x02 "random" may be set too: trace context level 2)
        assert trace_id == trace.format_trace_id(context.trace_id)
        assert parent_id == trace.format_span_id(context.span_id)


async def test_without_a_span_the_pep_sdk_sends_no_traceparent() -> None:
    seen: list[httpx.Request] = []
    check = RevocationCheck(
        "https://as.example/introspect", ClientSecretBasic("rs", "s"), _recording(seen)
    )
    await check.is_active("token", "k", int(time.time()) + 60)
    assert "traceparent" not in seen[0].headers


# --------------------------------------------------------------------------- a real OTLP receiver


class OtlpReceiver:
    """A collector's OTLP/HTTP trace endpoint: protobuf ``ExportTraceServiceRequest`` POSTs."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = self.path == "/v1/traces" and self.headers["Content-Type"] == (
                    "application/x-protobuf"
                )
                if ok:
                    message = ExportTraceServiceRequest()
                    message.ParseFromString(body)
                    receiver.requests.append(message)
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[Any]:
        return [
            span
            for request in list(self.requests)
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LiveServers]:
    with running_servers(tmp_path) as live:
        yield live


@pytest.mark.e2e
def test_a_real_server_exports_its_spans_over_otlp_http(
    servers: LiveServers, collector: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
    server = servers.start(otel_exporter_otlp_endpoint=collector.url, log_level="info")
    response = httpx.post(
        f"{server.base_url}/token",
        data={"grant_type": "client_credentials"},
        headers={"traceparent": TRACEPARENT},
        timeout=10,
    )
    assert response.status_code == 401
    span = wait_until(
        lambda: next((s for s in collector.spans() if s.trace_id.hex() == TRACE_ID), None),
        30,
        "the span at the OTLP receiver",
    )
    assert span.name == "POST /token"
    assert span.parent_span_id.hex() == PARENT_ID
    assert span.kind == span.SPAN_KIND_SERVER
    resource = collector.requests[0].resource_spans[0].resource
    attributes = {a.key: a.value.string_value for a in resource.attributes}
    assert attributes["service.name"] == "trustplane"

    # the refusal's log line and its audit entry carry the same trace id
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    refused = [line for line in lines if line.get("event") == "oauth:token:refused"]
    assert refused
    assert refused[0]["trace_id"] == TRACE_ID
    server.cli("audit", "integrate")
    db = Database(server.env["TRUSTPLANE_DATABASE_URL"])

    async def events() -> list[dict[str, Any]]:
        try:
            return await recent_events(db, 5, AuditEventType.TOKEN_REFUSED.value)
        finally:
            await db.dispose()

    found = asyncio.run(events())
    assert found[0]["correlation_id"] == TRACE_ID
