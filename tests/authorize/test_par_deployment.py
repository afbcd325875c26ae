"""Deployment-wide PAR and request-object requirements (``require_pushed_authorization_requests``,
``require_signed_request_object``) and ``par_lifetime`` on a running server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.authorize.conftest import register_code_client
from tests.authorize.flow import REDIRECT_URI, Flow, query_of
from tests.authorize.test_par_jar import json_error, push, request_object
from tests.conftest import EXECUTION
from tests.protocol_server import DATABASES, Server, running_server

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def strict(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(
        request,
        tmp_path_factory,
        require_pushed_authorization_requests=True,
        require_signed_request_object=True,
        par_lifetime=90,
    ) as server:
        yield server


def flow_of(server: Server, client_id: str) -> Flow:
    import httpx

    agent = httpx.AsyncClient(transport=server.http._transport, base_url=server.issuer)
    return Flow(agent, client_id, EXECUTION)


async def test_metadata_says_what_is_required(strict: Server) -> None:
    doc = (await strict.http.get("/.well-known/oauth-authorization-server")).json()
    assert doc["require_pushed_authorization_requests"] is True
    assert doc["require_signed_request_object"] is True


async def test_plain_and_jar_requests_at_authorize_are_refused(strict: Server) -> None:
    """RFC 9126 §5: with PAR required deployment-wide, nothing but a request_uri is accepted."""
    kit = await register_code_client(strict)
    flow = flow_of(strict, kit.client_id)
    plain = await flow.start()
    assert plain.status_code == 302
    assert plain.headers["location"].startswith(REDIRECT_URI + "?")
    assert query_of(plain.headers["location"])["error"] == "invalid_request"
    signed = request_object(kit, flow.params())
    jar = await flow.http.get("/authorize", params={"client_id": kit.client_id, "request": signed})
    assert jar.status_code == 302
    assert query_of(jar.headers["location"])["error"] == "invalid_request"


async def test_par_needs_a_signed_request_object(strict: Server) -> None:
    """RFC 9101 §10.5 deployment-wide: unsigned parameters at /par are refused."""
    kit = await register_code_client(strict)
    flow = flow_of(strict, kit.client_id)
    response = await push(strict, kit, flow.params())
    assert json_error(response) == (400, "invalid_request")
    response = await push(strict, kit, {"request": request_object(kit, flow.params())})
    assert response.status_code == 201, response.text
    assert response.json()["expires_in"] == 90
    page = await flow.http.get(
        "/authorize",
        params={"client_id": kit.client_id, "request_uri": response.json()["request_uri"]},
    )
    assert page.status_code == 200, page.text
    assert 'action="/authorize/login"' in page.text
