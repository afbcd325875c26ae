"""Instances that share only PostgreSQL: a change made anywhere reaches every instance by
``LISTEN``/``NOTIFY`` (trustplane.storage.notify), long before the poll would (the poll interval is set
to its 60 s maximum here, so anything seen sooner was pushed)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import EXECUTION
from tests.e2e.conftest import (
    LiveServer,
    LiveServers,
    client_credentials_token,
    register_client,
)
from tests.e2e.test_authzen_http import order_request, post
from trustplane.authzen.wire import request_to_json

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


def test_revocation_on_one_instance_is_pushed_to_the_other(
    live_server: LiveServers, pg_url: str
) -> None:
    """The bearer guard's revocation list is in memory: a token revoked at instance A is refused by
    instance B's AuthZEN endpoint within a moment, not at B's next poll."""
    a, b = live_server.start_cluster(2, pg_url, cache_refresh_interval="60")
    api = f"{a.issuer}/access/v1"
    kit = register_client(a, b, scopes=("decision:evaluate",), resources=(api,))
    token = client_credentials_token(a, kit, "decision:evaluate", api)
    body = request_to_json(order_request())

    def evaluation_status() -> int:
        return post(b, "evaluation", body, token).status_code

    assert evaluation_status() == 200
    revoked = httpx.post(
        f"{a.base_url}/revoke",
        data={"token": token, "token_type_hint": "access_token", **kit.auth()},
        timeout=10,
    )
    assert revoked.status_code == 200, revoked.text
    took = _seen_within(lambda: evaluation_status() == 401, PUSHED_WITHIN)
    assert took < PUSHED_WITHIN
    refused = post(b, "evaluation", body, token)
    assert refused.json()["error"] == "invalid_token"
