"""The in-memory revocation list behind the bearer guard: read from the database on first use, listed
at once by the revoking process, reloaded when any other writer's revocation moves the generation.
And the one error renderer's answers for what is not a request problem."""

from __future__ import annotations

import time

import orjson
import pytest
from prometheus_client import REGISTRY

from trustplane.app import Services
from trustplane.bearer_guard import RevokedTokens
from trustplane.bearer_guard.http import render_error
from trustplane.errors import ErrorTable, InvalidRequestError, NotFoundError
from trustplane.protocol.revocations import GENERATION, SqlRevocationStore
from trustplane.storage import generations
from trustplane.storage.writer import WriterUnavailable


async def test_first_use_reads_what_is_already_revoked(services: Services) -> None:
    exp = int(time.time()) + 300
    async with services.db.transaction() as conn:
        await SqlRevocationStore().revoke(conn, "jti-before", "c-1", exp)
        await SqlRevocationStore().revoke(conn, "jti-expired", "c-1", int(time.time()) - 1)
    fresh = RevokedTokens(services.db)

    assert await fresh.listed("jti-before")
    assert not await fresh.listed("jti-expired")  # expired rows are not kept in memory
    assert not await fresh.listed("jti-other")


async def test_a_revocation_through_the_list_is_listed_before_any_reload(
    services: Services,
) -> None:
    revoked = services.revoked
    assert not await revoked.listed("jti-local")

    async with services.db.transaction() as conn:
        assert await revoked.revoke(conn, "jti-local", "c-1", int(time.time()) + 300)

    assert await revoked.listed("jti-local")
    await revoked.load()  # a reload keeps it (and the database has it too)
    assert await revoked.listed("jti-local")


async def test_another_writers_revocation_moves_the_generation_and_is_reloaded(
    services: Services,
) -> None:
    """What the authorization-code grant (replay) or another process writes, with its own store."""
    seen: dict[str, int] = {}
    await services.refresh_caches(seen)
    assert not await services.revoked.listed("jti-elsewhere")
    before = (
        REGISTRY.get_sample_value("trustplane_cache_reloads_total", {"cache": "revocations"}) or 0.0
    )

    async with services.db.transaction() as conn:
        assert await SqlRevocationStore().revoke(
            conn, "jti-elsewhere", "c-1", int(time.time()) + 60
        )
        again = await SqlRevocationStore().revoke(conn, "jti-elsewhere", "c-1", 0)
    async with services.db.read() as conn:
        current = await generations.read_all(conn)
    await services.refresh_caches(seen)

    assert again is False
    assert current[GENERATION] == seen[GENERATION] >= 1
    assert await services.revoked.listed("jti-elsewhere")
    after = REGISTRY.get_sample_value("trustplane_cache_reloads_total", {"cache": "revocations"})
    assert after == before + 1


TABLE = ErrorTable("test_api", {KeyError: lambda exc: NotFoundError(f"no {exc.args[0]}")})


@pytest.mark.parametrize(
    ("exc", "status", "body"),
    [
        (InvalidRequestError("bad"), 400, {"error": "invalid_request", "error_description": "bad"}),
        (KeyError("thing"), 404, {"error": "not_found", "error_description": "no thing"}),
        (
            WriterUnavailable("stopped"),
            503,
            {"error": "temporarily_unavailable", "error_description": "try again shortly"},
        ),
        (
            ConnectionRefusedError(),
            503,
            {"error": "temporarily_unavailable", "error_description": "try again shortly"},
        ),
        (
            RuntimeError("a bug"),
            500,
            {"error": "server_error", "error_description": "internal error"},
        ),
    ],
    ids=["typed", "table", "writer", "network", "bug"],
)
def test_the_renderer(exc: Exception, status: int, body: dict[str, str]) -> None:
    labels = {"endpoint": "test_api", "error": body["error"]}
    before = REGISTRY.get_sample_value("trustplane_protocol_errors_total", labels) or 0.0

    response = render_error(exc, TABLE)

    assert response.status_code == status
    assert orjson.loads(response.body) == body
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/json"
    assert REGISTRY.get_sample_value("trustplane_protocol_errors_total", labels) == before + 1
