"""A database that cannot serve now is a dependency failure (503 with ``Retry-After``), not a bug
(500): among them a PostgreSQL server out of connections, whose asyncpg error reaches SQLAlchemy as
a plain ``DBAPIError`` (seen under a loaded benchmark: introspection answered 500)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request

from tests.conftest import PG_ADMIN_URL, make_settings, pg_admin, require_service
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


# --------------------------------------------------------------------------- vacuum at start


def test_vacuum_is_not_warned_when_autovacuum_keeps_up() -> None:
    from structlog.testing import capture_logs

    from trustplane.dependencies import warn_vacuum

    with capture_logs() as logs:
        assert warn_vacuum(True, [("audit_pending", 12, False), ("used_jtis", 0, False)]) == []
    assert logs == []


def test_autovacuum_off_on_the_server_names_every_churn_table() -> None:
    from structlog.testing import capture_logs

    from trustplane.dependencies import warn_vacuum

    with capture_logs() as logs:
        events = warn_vacuum(False, [("audit_pending", 0, False), ("used_jtis", 0, False)])
    assert events == ["database_autovacuum_off"]
    assert (logs[0]["log_level"], logs[0]["scope"], logs[0]["tables"]) == (
        "warning",
        "server",
        ["audit_pending", "used_jtis"],
    )


@pytest.fixture
async def churn_db(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A scratch PostgreSQL database holding two churn tables (bare: the check reads only the
    catalog and the statistics), with a low dead-row threshold."""
    from trustplane import dependencies

    require_service("PostgreSQL", "127.0.0.1", 5432)
    monkeypatch.setattr(dependencies, "DEAD_ROWS_WARNING", 20)
    name = f"tp_vacuum_{secrets.token_hex(4)}"
    await pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
async def test_a_table_without_vacuum_and_its_dead_rows_are_warned_at_start(
    churn_db: str, tmp_path: Path
) -> None:
    """Read off the server: ``autovacuum_enabled = false`` on ``audit_pending``, and dead rows past
    the threshold, are both warned; the server-wide setting decides whether every table is named."""
    from structlog.testing import capture_logs

    from trustplane.dependencies import warn_unreachable

    db = Database(churn_db)
    try:
        async with db.transaction() as conn:
            await conn.execute(text("CREATE TABLE audit_pending (seq bigint)"))
            await conn.execute(text("CREATE TABLE used_jtis (jti text)"))
            await conn.execute(text("ALTER TABLE audit_pending SET (autovacuum_enabled = false)"))
            await conn.execute(text("INSERT INTO audit_pending SELECT generate_series(1, 50)"))
        async with db.transaction() as conn:
            await conn.execute(text("DELETE FROM audit_pending"))
        async with db.read() as conn:
            server_on = (await conn.execute(text("SHOW autovacuum"))).scalar() == "on"

        async def dead_rows() -> int:
            async with db.read() as conn:
                await conn.execute(text("SELECT pg_stat_force_next_flush()"))
                query = "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname='audit_pending'"
                return int((await conn.execute(text(query))).scalar() or 0)

        deadline = asyncio.get_running_loop().time() + 10
        while await dead_rows() < 50:  # the statistics are flushed after the transaction
            assert asyncio.get_running_loop().time() < deadline, "no dead rows counted in 10 s"
            await asyncio.sleep(0.1)
    finally:
        await db.dispose()

    with capture_logs() as logs:
        assert await warn_unreachable(make_settings(churn_db, tmp_path)) == []
    by_event = {e["event"]: e for e in logs}
    off = by_event["database_autovacuum_off"]
    assert off["tables"] == (["audit_pending", "used_jtis"] if not server_on else ["audit_pending"])
    assert off["scope"] == ("table" if server_on else "server")
    assert by_event["database_dead_rows"]["dead_rows"] == {"audit_pending": 50}
