"""The AuthZEN PDP's batch endpoint as a PEP's coalesced decisions use it: each evaluation's own
``correlation_id`` member (trustplane's extension) is the id its decision is recorded under, the
request's ``X-Request-ID`` the default; and ``AuthzenClient`` callers asking at once share one
``/evaluations`` request to the in-process PDP, each recorded under its own id."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from tests.policy.test_authzen import OTHER_LEI, caller, evaluation, order, post
from tests.protocol_server import Server
from trustplane.authzen.model import Decision
from trustplane.authzen.wire import entity_from_json
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import AuthzenClient, PrivateKeyJwt

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def token(server: Server) -> str:
    return (await caller(server))[1]


async def recorded(server: Server, decision_ids: list[str]) -> dict[str, tuple[bool, str | None]]:
    """decision id -> (allowed, correlation id) in the PDP's decision records."""
    async with server.services.db.read() as conn:
        rows = (
            await conn.execute(
                text("SELECT decision_id, allowed, correlation_id FROM policy_decisions")
            )
        ).all()
    return {r[0]: (bool(r[1]), r[2]) for r in rows if r[0] in decision_ids}


async def test_each_evaluation_is_recorded_under_its_own_correlation_id(
    server: Server, token: str
) -> None:
    body = {
        **evaluation(),
        "evaluations": [
            {"correlation_id": "caller-a"},
            {},  # none of its own: the request's X-Request-ID
            {"correlation_id": "caller-b", "resource": order(owner=OTHER_LEI)},
        ],
    }

    response = await post(server, "evaluations", body, token, **{"X-Request-ID": "the-request"})

    assert response.status_code == 200, response.text
    ids = [e["context"]["decision_id"] for e in response.json()["evaluations"]]
    assert await recorded(server, ids) == {
        ids[0]: (True, "caller-a"),
        ids[1]: (True, "the-request"),
        ids[2]: (False, "caller-b"),
    }
    assert response.headers["x-request-id"] == "the-request"


async def test_a_top_level_correlation_id_is_a_default(server: Server, token: str) -> None:
    body = {**evaluation(), "correlation_id": "default-c", "evaluations": [{}]}
    body["evaluations"].append({"correlation_id": "own-c"})

    response = await post(server, "evaluations", body, token)

    ids = [e["context"]["decision_id"] for e in response.json()["evaluations"]]
    assert await recorded(server, ids) == {ids[0]: (True, "default-c"), ids[1]: (True, "own-c")}


async def test_a_single_evaluation_may_name_its_correlation_id(server: Server, token: str) -> None:
    response = await post(server, "evaluation", evaluation(correlation_id="single-c"), token)

    decision_id = response.json()["context"]["decision_id"]
    assert await recorded(server, [decision_id]) == {decision_id: (True, "single-c")}


@pytest.mark.parametrize(
    ("value", "where"),
    [(7, "evaluations[1]."), ("", "evaluations[1]."), ("x" * 257, "evaluations[1].")],
    ids=["a number", "empty", "too long"],
)
async def test_a_bad_correlation_id_is_400(
    server: Server, token: str, value: Any, where: str
) -> None:
    body = {**evaluation(), "evaluations": [{}, {"correlation_id": value}]}

    response = await post(server, "evaluations", body, token)

    assert response.status_code == 400, response.text
    assert f"{where}correlation_id must be a string" in response.json()["error_description"]


async def test_concurrent_pep_decisions_share_a_request_and_keep_their_ids(server: Server) -> None:
    kit, _ = await caller(server)
    paths: list[str] = []

    async def through_the_app(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        answer = await server.http.send(request)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    fetcher = OutboundFetcher(
        OutboundPolicy.development(), transport=httpx.MockTransport(through_the_app)
    )
    client = AuthzenClient(
        server.issuer,
        token_endpoint=f"{server.issuer}/token",
        auth=PrivateKeyJwt(kit.client_id, kit.key, kit.kid, server.issuer),
        fetcher=fetcher,
        max_in_flight=1,  # the first alone, the other four queued behind it
    )
    owners = [None, OTHER_LEI, None, OTHER_LEI, None]
    try:
        decisions = await asyncio.gather(
            *(ask(client, f"pep-{i}", owner) for i, owner in enumerate(owners))
        )
    finally:
        await fetcher.aclose()

    assert [d.allowed for d in decisions] == [owner is None for owner in owners]
    # asked at once: the first goes alone at once, the four asked meanwhile share the next request
    assert paths == ["/token", "/access/v1/evaluation", "/access/v1/evaluations"]
    records = await recorded(server, [d.decision_id for d in decisions])
    assert [records[d.decision_id] for d in decisions] == [
        (owner is None, f"pep-{i}") for i, owner in enumerate(owners)
    ]


async def ask(client: AuthzenClient, correlation_id: str, owner: str | None) -> Decision:
    wire = evaluation() if owner is None else evaluation(resource=order(owner=owner))
    return await client.decide(
        entity_from_json(wire["subject"], "subject"),
        wire["action"]["name"],
        entity_from_json(wire["resource"], "resource"),
        wire["context"],
        correlation_id=correlation_id,
    )
