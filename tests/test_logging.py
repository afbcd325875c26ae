"""Log lines: JSON by default, and an exception logged with ``exc_info`` carries its traceback."""

from __future__ import annotations

import json

import pytest
import structlog

from trustplane.logging import configure_logging


@pytest.fixture(autouse=True)
def restore_structlog() -> object:
    """From structlog's defaults: ``configure_logging`` keeps the logger factory that an earlier
    command set (the CLI's log to stderr), so a test run after one would find stdout empty."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def _log_a_failure() -> None:
    """Log a caught exception with ``exc_info``, as the protocol endpoints do."""
    try:
        raise LookupError("the mandate's issuer cannot be asked")
    except LookupError:
        structlog.get_logger("t").error("introspection_failed", exc_info=True)


def test_a_json_line_carries_the_traceback_of_exc_info(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    _log_a_failure()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["event"] == "introspection_failed"
    assert "exc_info" not in line
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "in _log_a_failure" in line["exception"]
    assert line["exception"].rstrip().endswith("LookupError: the mandate's issuer cannot be asked")


def test_a_line_without_exception_has_none(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    structlog.get_logger("t").info("started", port=8000)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["event"] == "started"
    assert line["port"] == 8000
    assert "exception" not in line


def test_the_console_renders_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console")
    _log_a_failure()
    out = capsys.readouterr().out
    assert "introspection_failed" in out
    assert "LookupError" in out
    assert "the mandate's issuer cannot be asked" in out
