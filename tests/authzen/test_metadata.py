"""The PDP metadata of an issuer with a path (AuthZEN 1.0 §9.2): published where the well-known
string is inserted between the host and the path, naming that same identifier (§9.2.3: a PEP MUST
NOT use a document whose ``policy_decision_point`` differs from the identifier it formed the URL
from). Only the routing is at stake: one SQLite server, no PostgreSQL variant."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.protocol_server import Server, running_server

pytestmark = pytest.mark.asyncio(loop_scope="module")
HOST = "http://127.0.0.1:8000"
ISSUER = f"{HOST}/tenant-a"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(request, tmp_path_factory, "sqlite", issuer=ISSUER) as started:
        yield started


async def test_metadata_is_at_the_inserted_well_known_location(server: Server) -> None:
    response = await server.http.get(f"{HOST}/.well-known/authzen-configuration/tenant-a")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "policy_decision_point": ISSUER,
        "access_evaluation_endpoint": f"{ISSUER}/access/v1/evaluation",
        "access_evaluations_endpoint": f"{ISSUER}/access/v1/evaluations",
    }


async def test_the_path_less_location_still_answers_for_a_proxied_mount(server: Server) -> None:
    """A deployment mounted under ``/tenant-a`` by a proxy is asked
    ``/tenant-a/.well-known/authzen-configuration``, which reaches it without its prefix."""
    response = await server.http.get(f"{HOST}/.well-known/authzen-configuration")

    assert response.status_code == 200
    assert response.json()["policy_decision_point"] == ISSUER


async def test_another_tenant_path_is_not_found(server: Server) -> None:
    response = await server.http.get(f"{HOST}/.well-known/authzen-configuration/tenant-b")

    assert response.status_code == 404
