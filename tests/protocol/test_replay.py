"""The replay-cache contract (RFC 7523 §3 item 7: a jti is accepted once until it expires), run against
the SQL cache on SQLite and PostgreSQL and against the Redis cache."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import REDIS_URL, make_settings, require_service, truncate_all
from trustplane.app import Services
from trustplane.protocol.replay import RedisReplayCache, SqlReplayCache, used_jtis
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade
from trustplane.storage.writer import GroupCommitWriter


@dataclass
class Subject:
    cache: SqlReplayCache | RedisReplayCache
    writer: GroupCommitWriter | None = None
    db: Database | None = None


@asynccontextmanager
async def sql_subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'replay.db'}")
        await upgrade(db)
    else:
        url = request.getfixturevalue("pg_database")
        await truncate_all(url)
        db = Database(url)
    writer = GroupCommitWriter(db)
    cache = SqlReplayCache(writer, db)
    writer.start()
    try:
        yield Subject(cache, writer, db)
    finally:
        await writer.stop()
        await db.dispose()


SQL = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=[*SQL, pytest.param("redis", marks=pytest.mark.redis)])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    """Every implementation of the ReplayCache protocol."""
    if request.param == "redis":
        require_service("Redis", "127.0.0.1", 6379)
        redis_cache = RedisReplayCache(REDIS_URL)
        yield Subject(redis_cache)
        await redis_cache.aclose()
        return
    async with sql_subject(request, tmp_path) as sql:
        yield sql


@pytest.fixture(params=SQL)
async def sql(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    async with sql_subject(request, tmp_path) as subject:
        yield subject


@pytest.fixture
def issuer() -> str:
    """Unique per test, so that Redis keys of other tests and runs never collide (no FLUSHDB)."""
    return f"tp-{uuid.uuid4().hex}"


def soon() -> int:
    return int(time.time()) + 60


async def test_first_consume_wins_second_loses(subject: Subject, issuer: str) -> None:
    assert await subject.cache.consume(issuer, "jti-1", soon()) is True
    assert await subject.cache.consume(issuer, "jti-1", soon()) is False
    assert await subject.cache.consume(issuer, "jti-1", soon() + 600) is False


async def test_same_jti_from_different_issuers_are_independent(
    subject: Subject, issuer: str
) -> None:
    assert await subject.cache.consume(issuer, "shared", soon()) is True
    assert await subject.cache.consume(issuer + "-other", "shared", soon()) is True
    assert await subject.cache.consume(issuer, "shared", soon()) is False
    assert await subject.cache.consume(issuer + "-other", "shared", soon()) is False


async def test_issuer_and_jti_do_not_run_together(subject: Subject, issuer: str) -> None:
    """("a:b", "c") and ("a", "b:c") are different assertions, whatever the key encoding."""
    assert await subject.cache.consume(f"{issuer}:x", "y", soon()) is True
    assert await subject.cache.consume(issuer, "x:y", soon()) is True


async def test_different_jtis_from_one_issuer(subject: Subject, issuer: str) -> None:
    results = [await subject.cache.consume(issuer, f"jti-{i}", soon()) for i in range(5)]

    assert results == [True] * 5


async def test_an_expired_entry_can_be_reclaimed(subject: Subject, issuer: str) -> None:
    past = int(time.time()) - 5

    assert await subject.cache.consume(issuer, "old", past) is True
    if isinstance(subject.cache, RedisReplayCache):
        # Redis keeps every key at least one second; wait for Redis itself to expire it.
        for _ in range(40):
            if await subject.cache.consume(issuer, "old", soon()):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the expired jti was never released")
    else:
        assert await subject.cache.consume(issuer, "old", soon()) is True
    assert await subject.cache.consume(issuer, "old", soon()) is False


async def test_duplicates_racing_in_one_batch_exactly_one_wins(
    subject: Subject, issuer: str
) -> None:
    batches = subject.writer.batches if subject.writer else 0

    results = await asyncio.gather(
        *(subject.cache.consume(issuer, "dup", soon()) for _ in range(20))
    )

    assert results.count(True) == 1
    if subject.writer is not None:
        assert subject.writer.batches == batches + 1  # all twenty went into one statement


MIXED = ("a", "a", "b", "seen", "a", "c", "b")


async def test_mixed_concurrent_consumes_one_winner_per_jti(subject: Subject, issuer: str) -> None:
    assert await subject.cache.consume(issuer, "seen", soon()) is True

    results = await asyncio.gather(*(subject.cache.consume(issuer, j, soon()) for j in MIXED))

    wins = {jti: [r for j, r in zip(MIXED, results, strict=True) if j == jti] for jti in MIXED}
    assert {jti: won.count(True) for jti, won in wins.items()} == {
        "a": 1,
        "b": 1,
        "c": 1,
        "seen": 0,
    }


async def test_sql_batch_results_are_per_item_first_submission_wins(
    sql: Subject, issuer: str
) -> None:
    assert await sql.cache.consume(issuer, "seen", soon()) is True

    results = await asyncio.gather(*(sql.cache.consume(issuer, j, soon()) for j in MIXED))

    assert results == [True, False, True, False, False, True, False]


async def test_sql_consumption_is_durable_when_it_returns(sql: Subject, issuer: str) -> None:
    expires = soon()

    assert await sql.cache.consume(issuer, "durable", expires) is True

    assert sql.db is not None
    fresh = Database(sql.db.url)  # another engine: sees only committed rows
    try:
        async with fresh.read() as conn:
            rows = (
                await conn.execute(
                    select(used_jtis.c.jti, used_jtis.c.expires_at).where(
                        used_jtis.c.issuer == issuer
                    )
                )
            ).all()
    finally:
        await fresh.dispose()
    assert [tuple(r) for r in rows] == [("durable", expires)]


async def test_prune_forgets_only_expired_entries(subject: Subject, issuer: str) -> None:
    past = int(time.time()) - 5
    await subject.cache.consume(issuer, "expired", past)
    await subject.cache.consume(issuer, "live", soon())

    pruned = await subject.cache.prune()

    assert pruned == (0 if isinstance(subject.cache, RedisReplayCache) else 1)
    assert await subject.cache.consume(issuer, "live", soon()) is False


@pytest.mark.postgres
async def test_concurrent_consumes_from_two_processes_exactly_one_wins(
    pg_url: str, tmp_path: Path
) -> None:
    """Two independent Services (two writers, two engines) racing on the same assertions."""
    a = Services.build(make_settings(pg_url, tmp_path))
    b = Services.build(make_settings(pg_url, tmp_path))
    a.writer.start()
    b.writer.start()
    try:
        for round_ in range(5):
            jti = f"race-{round_}"
            results = await asyncio.gather(
                *(
                    (a if i % 2 else b).sql_replay.consume("tp-racer", jti, soon())
                    for i in range(50)
                )
            )

            assert results.count(True) == 1, results
        assert a.writer.items + b.writer.items == 250
    finally:
        await a.stop()
        await b.stop()


# --------------------------------------------------------------------------- Redis down (issue 11, 8)

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def _unavailable_count(dependency: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "trustplane_dependency_unavailable_total", {"dependency": dependency}
    )
    return value or 0.0


async def test_an_unreachable_redis_is_503_with_retry_after(issuer: str) -> None:
    from trustplane.errors import TemporarilyUnavailableError

    cache = RedisReplayCache(DEAD_REDIS)
    before = _unavailable_count("redis")
    try:
        with pytest.raises(TemporarilyUnavailableError) as exc:
            await cache.consume(issuer, "jti-1", soon())
    finally:
        await cache.aclose()
    assert (exc.value.status_code, exc.value.error) == (503, "temporarily_unavailable")
    assert exc.value.headers == {"Retry-After": "1"}
    assert _unavailable_count("redis") == before + 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_the_token_endpoint_answers_503_when_redis_is_down(
    settings_factory: Any,
) -> None:
    import httpx

    from tests.conftest import EXECUTION, _Started, register_kit
    from trustplane.app import create_app

    svc = Services.build(settings_factory(redis_url=DEAD_REDIS))
    await svc.start()
    try:
        kit = await register_kit(svc, grant_types=["client_credentials"])
        app = create_app(svc.settings, services=_Started(svc))  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=svc.settings.issuer) as http:
            form = {"grant_type": "client_credentials", "scope": "order:create"}
            response = await http.post("/token", data={**form, "resource": EXECUTION, **kit.auth()})
    finally:
        await svc.stop()
    assert response.status_code == 503
    assert response.json() == {
        "error": "temporarily_unavailable",
        "error_description": "a service this request needs (redis) is unavailable; try again shortly",
    }
    assert response.headers["retry-after"] == "1"
    assert response.headers["cache-control"] == "no-store"


def test_a_dependency_incident_is_logged_once_per_interval() -> None:
    from structlog.testing import capture_logs

    from trustplane.dependencies import IncidentLog

    incidents = IncidentLog(interval=3600)
    with capture_logs() as logs:
        for _ in range(50):
            incidents.failed("redis", ConnectionError("refused"))
        incidents.failed("database", ConnectionError("gone"))
    assert [(e["event"], e["dependency"]) for e in logs] == [
        ("dependency_unavailable", "redis"),
        ("dependency_unavailable", "database"),
    ]
    incidents = IncidentLog(interval=0)
    with capture_logs() as logs:
        incidents.failed("redis", ConnectionError("refused"))
        incidents.failed("redis", ConnectionError("refused"))
    assert len(logs) == 2


async def test_a_lost_database_on_a_protocol_endpoint_is_503() -> None:
    from sqlalchemy.exc import OperationalError
    from starlette.requests import Request

    from trustplane.protocol.responses import protocol_endpoint

    async def lost(_request: Request) -> Any:
        raise OperationalError("SELECT 1", {}, ConnectionResetError("connection reset"))

    before = _unavailable_count("database")
    handler = protocol_endpoint("token", lost)
    response: Any = await handler(Request({"type": "http", "headers": []}))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert _unavailable_count("database") == before + 1


async def test_a_bug_is_still_a_500() -> None:
    from starlette.requests import Request

    from trustplane.protocol.responses import protocol_endpoint

    async def bug(_request: Request) -> Any:
        raise KeyError("oops")

    response: Any = await protocol_endpoint("token", bug)(Request({"type": "http", "headers": []}))
    assert response.status_code == 500
    assert "retry-after" not in response.headers


async def test_unreachable_dependencies_are_warned_at_start(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from trustplane.dependencies import warn_unreachable

    settings = make_settings(
        "postgresql+asyncpg://postgres@127.0.0.1:1/x",
        tmp_path,
        redis_url=DEAD_REDIS,
        nats_url="nats://127.0.0.1:1",
    )
    with capture_logs() as logs:
        failed = await warn_unreachable(settings)
    assert failed == ["postgresql", "redis", "nats"]
    assert [(e["event"], e["dependency"], e["target"]) for e in logs] == [
        ("dependency_unreachable_at_start", "postgresql", "127.0.0.1:1"),
        ("dependency_unreachable_at_start", "redis", "127.0.0.1:1"),
        ("dependency_unreachable_at_start", "nats", "127.0.0.1:1"),
    ]


async def test_reachable_dependencies_are_not_warned(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from trustplane.dependencies import warn_unreachable

    require_service("Redis", "127.0.0.1", 6379)
    require_service("NATS", "127.0.0.1", 4222)
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        tmp_path,
        redis_url=REDIS_URL,
        nats_url="nats://127.0.0.1:4222",
    )
    with capture_logs() as logs:
        assert await warn_unreachable(settings) == []
    assert logs == []
