"""Instances that share only PostgreSQL: a change made anywhere reaches every instance by
``LISTEN``/``NOTIFY`` (trustplane.storage.notify), long before the poll would (the poll interval is set
to its 60 s maximum here, so anything seen sooner was pushed)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import EXECUTION
from tests.e2e.conftest import LiveServer, LiveServers, register_client

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

#: Far below the 60 s poll; generous for a loaded, shared machine (the push itself takes milliseconds).
PUSHED_WITHIN = 3.0


def _seen_within(predicate: object, timeout: float) -> float:
    """Seconds until ``predicate()`` is true; fails the test after ``timeout``."""
    assert callable(predicate)
    started = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - started
        assert elapsed < timeout, f"not seen within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - started


def test_changes_are_pushed_to_the_other_instance(live_server: LiveServers, pg_url: str) -> None:
    a, b = live_server.start_cluster(2, pg_url, cache_refresh_interval="60")
    # the CLI registers the client: both instances load it by notification (the poll is 60 s away)
    started = time.monotonic()
    kit = register_client(a, b)
    assert time.monotonic() - started < 60

    def token_status(server: LiveServer) -> int:
        response = httpx.post(
            f"{server.base_url}/token",
            data={
                "grant_type": "client_credentials",
                "scope": "order:create",
                "resource": EXECUTION,
                **kit.auth(),
            },
            timeout=10,
        )
        return response.status_code

    assert token_status(b) == 200
    # disabled through instance A's database: B refuses the client within a moment
    a.cli("clients", "disable", kit.client_id)
    _seen_within(lambda: token_status(b) == 401, PUSHED_WITHIN)

    # key rotation: B publishes (and signs with) the new key within a moment
    def kids() -> set[str]:
        keys = httpx.get(f"{b.base_url}/jwks", timeout=10).json()["keys"]
        return {k["kid"] for k in keys}

    before = kids()
    a.cli("keys", "rotate")
    _seen_within(lambda: kids() != before, PUSHED_WITHIN)
