"""SSF 1.0 §8.1.1.1: the per-client stream cap holds under racing creations. Real ``trustplane
serve`` processes on loopback: two sharing one PostgreSQL database (as behind a load balancer), and
one on SQLite; many creations for one client are released at once and exactly
``MAX_STREAMS_PER_CLIENT`` of them succeed, every other one is 409 ``conflict``. The cap was a count
taken before the insert: racing creations all counted the same streams and a client reached more."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import run_sync, truncate_all
from tests.e2e.conftest import (
    LiveServer,
    client_credentials_token,
    race,
    register_client,
    running_servers,
)
from trustplane.ssf.transmitter import MAX_STREAMS_PER_CLIENT

pytestmark = pytest.mark.e2e
#: Creations released at once: several times the cap, so that many race for the last places.
RACERS = 4 * MAX_STREAMS_PER_CLIENT


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LiveServer]]:
    """PostgreSQL: two servers sharing the database; SQLite: one server."""
    with running_servers(tmp_path_factory.mktemp("ssf-cap")) as servers:
        if request.param == "postgresql":
            url = request.getfixturevalue("pg_database")
            run_sync(truncate_all(url))
            yield servers.start_cluster(2, url)
        else:
            yield [servers.start()]


def ssf_headers(cluster: list[LiveServer]) -> dict[str, str]:
    """A bearer token for the SSF management API, for a client of its own."""
    resource = f"{cluster[0].issuer}/ssf"
    kit = register_client(
        *cluster, scopes=("ssf:stream",), resources=(resource,), introspection_resources=()
    )
    token = client_credentials_token(cluster[0], kit, scope="ssf:stream", resource=resource)
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("round_", range(1, 5))
def test_racing_creations_never_pass_the_stream_cap(cluster: list[LiveServer], round_: int) -> None:
    headers = ssf_headers(cluster)  # a fresh client each round: no streams yet
    requests = [{"json": {"description": f"racer {i}"}, "headers": headers} for i in range(RACERS)]
    answers = run_sync(race(cluster, "/ssf/stream", requests))
    counted = collections.Counter(a.status_code for a in answers)
    assert counted == {201: MAX_STREAMS_PER_CLIENT, 409: RACERS - MAX_STREAMS_PER_CLIENT}, counted
    assert all(a.json()["error"] == "conflict" for a in answers if a.status_code == 409)
    listed = httpx.get(f"{cluster[0].base_url}/ssf/stream", headers=headers, timeout=10)
    created = {a.json()["stream_id"] for a in answers if a.status_code == 201}
    assert {s["stream_id"] for s in listed.json()} == created
