"""OpenTelemetry traces: a server span per request, the trace id in log lines and audit entries.

Tracing is on when an OTLP endpoint is configured: ``TRUSTPLANE_OTEL_EXPORTER_OTLP_ENDPOINT`` (the
collector's base URL; spans go to ``/v1/traces`` under it) or the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` variables, unless
``OTEL_SDK_DISABLED=true``. The other standard variables apply as the SDK reads them
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``, ...). Off, nothing is installed: the request path is
exactly what it is without this module (see ``bench/token_endpoint.py``).

On, :class:`spans.TracingMiddleware` opens a ``SERVER`` span around every request at the entry of the public
app (refusals by the size limits included), continuing the caller's trace when the request carries a
W3C ``traceparent`` (and ``tracestate``). While that span is current, every structlog line carries
``trace_id`` and ``span_id`` (:func:`spans.add_trace_ids`), and every audit event written without a
correlation id of its own gets the trace id as its ``correlation_id`` (``trustplane.audit_events.CORRELATION``, set when tracing starts), so an
auditor's entry leads to the trace and back. The PEP SDK sends ``traceparent`` on its calls to the
PDP, the token endpoint and the introspection endpoint (:func:`spans.inject_headers`).

The OTLP exporter posts with its own HTTP client, not through :mod:`trustplane.outbound`: the
collector's address is the operator's configuration, never taken from a request, and is usually on
loopback or a private network, which the guarded fetcher refuses by design.
"""

from __future__ import annotations

import os

from trustplane.settings import Settings

TRACES_PATH = "/v1/traces"


def otlp_endpoint(settings: Settings) -> str | None:
    """Where spans go (the full ``/v1/traces`` URL), or None: tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if settings.otel_exporter_otlp_endpoint:
        return settings.otel_exporter_otlp_endpoint.rstrip("/") + TRACES_PATH
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + TRACES_PATH
    return None
