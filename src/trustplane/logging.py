"""structlog configuration: JSON lines by default, console rendering for humans."""

from __future__ import annotations

import logging

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", fmt: str = "json", *, trace_ids: bool = False) -> None:
    """``trace_ids``: tracing is on, every line carries the current span's ``trace_id`` and
    ``span_id`` (``trustplane.tracing``; off, OpenTelemetry is not even imported)."""
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if fmt == "json":
        # ``exc_info`` becomes an ``exception`` string with the traceback (no local variables:
        # they may hold tokens or keys); without it a JSON line said only ``"exc_info": true``
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()  # renders the traceback itself
    if trace_ids:
        from trustplane.tracing.spans import add_trace_ids

        processors.append(add_trace_ids)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=True,
    )
