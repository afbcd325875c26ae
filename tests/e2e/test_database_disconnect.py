"""A server whose PostgreSQL connections are terminated under it keeps answering.

Checkouts are not pre-pinged (``trustplane.storage.db``): a connection the server closed is replaced
at checkout without a round trip, and the group-commit writer runs a batch whose connection died
once more on a fresh one. Here every backend of the server's database is terminated with
``pg_terminate_backend`` between two token requests; the next one is issued, with its assertion's
``jti`` and its audit record committed.
"""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import EXECUTION, run_sync
from tests.e2e.conftest import LiveServers, client_credentials_token, register_client
from trustplane.storage.db import async_url

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


async def _terminate_everyone_else(url: str) -> int:
    """Terminate every other backend of ``url``'s database, waiting until each has exited."""
    engine = create_async_engine(async_url(url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            result = await conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return int(result.scalar_one())
    finally:
        await engine.dispose()


async def _count(url: str, sql: str) -> int:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as conn:
            return int((await conn.exec_driver_sql(sql)).scalar_one())
    finally:
        await engine.dispose()


def test_token_requests_succeed_after_the_database_terminated_every_connection(
    live_server: LiveServers, module_pg_url: str
) -> None:
    server = live_server.start(module_pg_url)
    kit = register_client(server)
    client_credentials_token(server, kit)  # the writer and the pool now hold connections
    jtis_before = run_sync(_count(module_pg_url, "SELECT count(*) FROM used_jtis"))

    assert run_sync(_terminate_everyone_else(module_pg_url)) >= 1

    for _ in range(3):
        client_credentials_token(server, kit, resource=EXECUTION)
    assert run_sync(_count(module_pg_url, "SELECT count(*) FROM used_jtis")) == jtis_before + 3
    # a replayed assertion is still refused: the replay store is what answered above
    body = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        "resource": EXECUTION,
        **kit.auth(),
    }
    first = httpx.post(f"{server.base_url}/token", data=body, timeout=10.0)
    again = httpx.post(f"{server.base_url}/token", data=body, timeout=10.0)
    assert first.status_code == 200, first.text
    assert (again.status_code, again.json()["error"]) == (401, "invalid_client")
