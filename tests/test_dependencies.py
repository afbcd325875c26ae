"""A database that cannot serve now is a dependency failure (503 with ``Retry-After``), not a bug
(500): among them a PostgreSQL server out of connections, whose asyncpg error reaches SQLAlchemy as
a plain ``DBAPIError`` (seen under a loaded benchmark: introspection answered 500)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request

from tests.conftest import PG_ADMIN_URL, pg_admin, require_service
from trustplane.dependencies import database_failure
from trustplane.protocol.responses import protocol_endpoint
from trustplane.storage.db import Database


@pytest.fixture
async def exhausted_url() -> AsyncIterator[str]:
    """A login role with a connection limit of 0: every connection is refused with SQLSTATE
    53300 (too many connections), as when the server's ``max_connections`` is reached."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    role = f"tp_noconn_{secrets.token_hex(4)}"
    await pg_admin(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
    try:
        yield PG_ADMIN_URL.replace("postgres@", f"{role}@", 1)
    finally:
        await pg_admin(f"DROP ROLE IF EXISTS {role}")


async def _query(url: str) -> None:
    db = Database(url)
    try:
        async with db.read() as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_too_many_connections_is_a_database_failure(exhausted_url: str) -> None:
    with pytest.raises(DBAPIError, match="too many connections") as caught:
        await _query(exhausted_url)
    assert getattr(caught.value.orig, "sqlstate", None) == "53300"
    assert database_failure(caught.value)


@pytest.mark.postgres
async def test_a_protocol_endpoint_answers_503_with_retry_after(exhausted_url: str) -> None:
    async def introspect(_request: Request) -> object:
        await _query(exhausted_url)
        raise AssertionError("unreachable: the database refuses every connection")

    handler = protocol_endpoint("introspection", introspect)  # type: ignore[arg-type]
    response = await handler(Request({"type": "http", "method": "POST", "headers": []}))
    assert response.status_code == 503  # type: ignore[union-attr]
    assert b'"temporarily_unavailable"' in response.body  # type: ignore[union-attr]
    assert response.headers["retry-after"]  # type: ignore[union-attr]


@pytest.mark.postgres
async def test_a_refused_query_is_still_not_a_database_failure(pg_url: str) -> None:
    """A query the database refuses (here: an unknown table, SQLSTATE 42P01) stays a bug."""
    db = Database(pg_url)
    try:
        with pytest.raises(DBAPIError, match="no_such_table") as caught:
            async with db.read() as conn:
                await conn.execute(text("SELECT * FROM no_such_table"))
    finally:
        await db.dispose()
    assert not database_failure(caught.value)
