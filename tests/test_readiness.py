"""Readiness (``/readyz``, ``trustplane.readiness``): each check passes on a healthy deployment (SQLite
and PostgreSQL) and fails on its own fault; the answer is cached for a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from trustplane import readiness
from trustplane.app import Services
from trustplane.readiness import HEARTBEAT, ReadinessProbe
from trustplane.storage import generations
from trustplane.storage.db import Database


@pytest.fixture
async def running(services: Services) -> AsyncIterator[Services]:
    """The services with the ledger's sequencer loop running (as in the app's lifespan)."""
    stopping = asyncio.Event()
    task = asyncio.create_task(services.ledger.run(stopping))
    await asyncio.sleep(0)  # the loop marks its start before its first wait
    assert services.ledger.progress_age() is not None
    yield services
    stopping.set()  # as the lifespan does: never cancelled inside its transaction
    await task


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def heartbeat(db: Database) -> int:
    async with db.read() as conn:
        return (await generations.read_all(conn)).get(HEARTBEAT, 0)


async def test_ready_when_everything_works(running: Services) -> None:
    result = await ReadinessProbe(running).evaluate()
    assert result.body() == {
        "status": "ready",
        "checks": {"database": {"ok": True}, "keys": {"ok": True}, "ledger": {"ok": True}},
    }


async def test_the_database_check_commits_a_write(running: Services) -> None:
    before = await heartbeat(running.db)
    await ReadinessProbe(running).evaluate()
    assert await heartbeat(running.db) == before + 1


async def test_the_heartbeat_wakes_no_other_process(
    running: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat is committed without ``NOTIFY``: no cache depends on it, so a probe must not
    wake every process of the deployment to read the counters."""
    announced: list[str] = []

    async def announce(_conn: Any, name: str) -> None:
        announced.append(name)

    monkeypatch.setattr(generations, "announce", announce)
    before = await heartbeat(running.db)
    await ReadinessProbe(running).evaluate()
    assert await heartbeat(running.db) == before + 1
    assert announced == []
    async with running.db.transaction() as conn:  # any other counter still announces
        await generations.bump(conn, "clients")
    assert announced == ["clients"]


async def test_the_answer_is_cached_for_a_second(running: Services) -> None:
    clock = Clock()
    probe = ReadinessProbe(running, clock)
    before = await heartbeat(running.db)
    results = await asyncio.gather(*(probe.evaluate() for _ in range(50)))
    clock.now += 0.5
    await probe.evaluate()
    assert await heartbeat(running.db) == before + 1  # 51 probes, one write
    assert all(r.ready for r in results)
    clock.now += 0.6
    await probe.evaluate()
    assert await heartbeat(running.db) == before + 2


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_read_only_sqlite_database_is_not_ready(
    running: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # SQLAlchemy's "file:" URI form makes a directory of that name
    path = Path(running.db.url.split("///", 1)[1])
    read_only = Database(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true")
    monkeypatch.setattr(running, "db", read_only)
    try:
        result = await ReadinessProbe(running).evaluate()
    finally:
        await read_only.dispose()
    assert result.ready is False
    assert result.checks["database"] == {
        "ok": False,
        "reason": "the database does not accept writes",
    }
    assert result.checks["keys"] == {"ok": True}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_read_only_data_directory_is_not_ready(running: Services) -> None:
    directory = Path(running.db.url.split("///", 1)[1]).parent
    mode = directory.stat().st_mode
    directory.chmod(0o555)
    try:
        result = await ReadinessProbe(running).evaluate()
    finally:
        directory.chmod(mode)
    assert result.checks["database"] == {"ok": False, "reason": "the data directory is read-only"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_full_disk_is_not_ready(running: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        readiness.shutil, "disk_usage", lambda _path: type("U", (), {"free": 4096})()
    )
    result = await ReadinessProbe(running).evaluate()
    assert result.checks["database"] == {
        "ok": False,
        "reason": "less than 16 MiB free on the data directory's disk",
    }


async def test_a_stalled_ledger_sequencer_is_not_ready(
    running: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(running.ledger, "progress_age", lambda: 600.0)
    result = await ReadinessProbe(running).evaluate()
    assert result.ready is False
    assert result.checks["ledger"] == {
        "ok": False,
        "reason": "the ledger sequencer made no progress for 600 s",
    }


async def test_a_ledger_that_never_ran_is_not_ready(services: Services) -> None:
    result = await ReadinessProbe(services).evaluate()
    assert result.checks["ledger"] == {
        "ok": False,
        "reason": "the ledger sequencer has not run yet",
    }


async def test_failing_integrations_stop_the_progress_clock(
    running: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = asyncio.Queue[None]()

    async def broken() -> int:
        failures.put_nowait(None)
        raise RuntimeError("disk I/O error")

    monkeypatch.setattr(running.ledger, "integrate_all", broken)
    await failures.get()  # the round in flight when patched may still have succeeded
    last_success = running.ledger._last_progress
    await asyncio.wait_for(failures.get(), 30)
    await asyncio.wait_for(failures.get(), 30)
    assert running.ledger._last_progress == last_success  # two failed rounds moved nothing


async def test_a_sequencer_that_never_empties_the_queue_is_making_progress(
    running: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under sustained load every round integrates and more is pending again: the loop's
    ``integrate_all`` never returns, yet each integration is progress (a saturated instance seen
    as not ready was taken out of the load balancer, turning overload into 503s)."""
    from trustplane.audit.ledger import Integration

    integrated = asyncio.Queue[None]()

    async def always_more() -> Integration:
        await asyncio.sleep(0.01)
        integrated.put_nowait(None)
        return Integration(0, 1, 1, b"", 0.01)

    monkeypatch.setattr(running.ledger, "integrate", always_more)
    await asyncio.wait_for(integrated.get(), 30)  # the loop is inside integrate_all now
    running.ledger._last_progress = time.monotonic() - 600
    for _ in range(3):
        await asyncio.wait_for(integrated.get(), 30)
    age = running.ledger.progress_age()
    assert age is not None
    assert age < 60
    assert (await ReadinessProbe(running).evaluate()).checks["ledger"]["ok"] is True


async def test_no_signing_key_is_not_ready(
    running: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trustplane.keys.service import KeyRing

    monkeypatch.setattr(running.keys, "ring", KeyRing(signer=None))
    result = await ReadinessProbe(running).evaluate()
    assert result.checks["keys"] == {"ok": False, "reason": "no active signing key is loaded"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_an_unreachable_redis_is_not_ready(
    running: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trustplane.protocol.replay import RedisReplayCache

    dead = RedisReplayCache("redis://127.0.0.1:1/0")
    settings: Any = running.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    monkeypatch.setattr(running, "settings", settings)
    monkeypatch.setattr(running, "replay", dead)
    try:
        result = await ReadinessProbe(running).evaluate()
    finally:
        await dead.aclose()
    assert result.checks["redis"] == {"ok": False, "reason": "redis does not answer"}
    assert result.ready is False
