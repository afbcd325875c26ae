"""Single-use things stay single-use across processes: two live servers share one PostgreSQL database
(and, in the Redis variant, one Redis replay cache), and many requests race for the same thing."""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select

from tests.conftest import (
    EXECUTION,
    LEI,
    REDIS_URL,
    jwks_for,
    new_ec_key,
    require_service,
    run_sync,
)
from tests.e2e.conftest import LiveServer, race, register_client, running_servers
from trustplane.audit.sink import recent_events
from trustplane.clients.tables import clients
from trustplane.storage.db import Database

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

RACERS = 40


@pytest.fixture(
    scope="module", params=["sql-replay", pytest.param("redis-replay", marks=pytest.mark.redis)]
)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LiveServer]]:
    """Two servers, one PostgreSQL database, one KEK, one issuer."""
    database_url: str = request.getfixturevalue("module_pg_url")
    settings = {}
    if request.param == "redis-replay":
        require_service("Redis", "127.0.0.1", 6379)
        settings["redis_url"] = REDIS_URL
    with running_servers(tmp_path_factory.mktemp("cluster")) as servers:
        yield servers.start_cluster(2, database_url, **settings)


async def fetch_all(database_url: str, query: Any) -> list[Any]:
    db = Database(database_url)
    try:
        async with db.read() as conn:
            return list((await conn.execute(query)).scalars())
    finally:
        await db.dispose()


async def issued_events(database_url: str) -> list[Any]:
    db = Database(database_url)
    try:
        return await recent_events(db, limit=100_000, type_="oauth:token:issued")
    finally:
        await db.dispose()


def statuses(responses: list[httpx.Response]) -> collections.Counter[int]:
    return collections.Counter(r.status_code for r in responses)


def test_one_assertion_wins_once_across_servers(cluster: list[LiveServer]) -> None:
    kit = register_client(*cluster)
    form = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        "resource": EXECUTION,
        **kit.auth(),
    }

    responses = run_sync(race(cluster, "/token", [{"data": form}] * RACERS))

    assert statuses(responses) == {200: 1, 401: RACERS - 1}
    assert {r.json()["error"] for r in responses if r.status_code == 401} == {"invalid_client"}
    (winner,) = (r.json()["access_token"] for r in responses if r.status_code == 200)
    rows = [
        e["jti"]
        for e in run_sync(issued_events(cluster[0].env["TRUSTPLANE_DATABASE_URL"]))
        if e["client_id"] == kit.client_id
    ]
    assert rows == [jwt.decode(winner, options={"verify_signature": False})["jti"]]


@pytest.mark.parametrize("cluster", ["sql-replay"], indirect=True)
def test_single_use_registration_token_registers_once(cluster: list[LiveServer]) -> None:
    created = cluster[0].cli_json("registration-token", "create", "--lei", LEI, "--uses", "1")
    name = f"registration race {uuid.uuid4().hex}"
    metadata = {
        "client_name": name,
        "lei": LEI,
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
        "jwks": jwks_for(new_ec_key()),
    }
    bearer = {"Authorization": f"Bearer {created['initial_access_token']}"}

    responses = run_sync(race(cluster, "/register", [{"json": metadata, "headers": bearer}] * 20))

    assert statuses(responses) == {201: 1, 401: 19}
    assert {r.json()["error"] for r in responses if r.status_code == 401} == {"invalid_token"}
    (registered,) = (r.json()["client_id"] for r in responses if r.status_code == 201)
    query = select(clients.c.client_id).where(clients.c.metadata.contains(f'"{name}"'))
    assert run_sync(fetch_all(cluster[0].env["TRUSTPLANE_DATABASE_URL"], query)) == [registered]
