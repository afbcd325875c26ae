"""``trustplane events publish`` refuses to start without ``TRUSTPLANE_EVENTS_NATS_URL``: one line,
exit 2, no traceback (it runs the loop only once it knows where to publish)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import invoke, one_line


def test_publish_without_a_nats_url_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = invoke(tmp_path, "events", "publish", monkeypatch=monkeypatch)
    assert "TRUSTPLANE_EVENTS_NATS_URL is not set" in one_line(result)


def test_a_bad_nats_url_is_refused_by_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = invoke(
        tmp_path, "events", "publish", monkeypatch=monkeypatch,
        TRUSTPLANE_EVENTS_NATS_URL="http://127.0.0.1:4222",
    )  # fmt: skip
    assert "events_nats_url" in one_line(result).lower()
