"""The composition root's loops over its components (``trustplane.app``, ``trustplane.component``):
start in order, close in reverse with the database last, reload on a moved generation counter,
maintenance that survives a failing component, and a shutdown that lets a round finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from trustplane import app as app_module
from trustplane.app import Services, _stop_tasks
from trustplane.component import Component, Idle
from trustplane.settings import Settings
from trustplane.storage import generations


class Boom(Exception):
    pass


@dataclass
class Probe(Idle):
    """A component that records what the loops ask of it, and fails where told to."""

    name: str
    calls: list[str]
    watches: tuple[str, ...] = ()
    failing: set[str] = field(default_factory=set)

    def _record(self, moment: str) -> None:
        self.calls.append(f"{self.name}.{moment}")
        if moment in self.failing:
            raise Boom(moment)

    async def start(self) -> None:
        self._record("start")

    async def reload(self) -> None:
        self._record("reload")

    async def maintain(self) -> None:
        self._record("maintain")

    async def close(self) -> None:
        self._record("close")


@pytest.fixture
async def built(settings_factory: Callable[..., Settings]) -> AsyncIterator[Services]:
    """Services whose components are replaced by probes (the real ones are never started)."""
    svc = Services.build(settings_factory())
    yield svc
    await svc.db.dispose()


def probes(svc: Services, *specs: Probe) -> None:
    svc.components = specs


async def test_components_start_in_order_and_close_in_reverse_then_the_database(
    built: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    probes(built, Probe("a", calls), Probe("b", calls), Probe("c", calls))
    dispose = built.db.dispose

    async def recorded_dispose() -> None:
        calls.append("db.dispose")
        await dispose()

    monkeypatch.setattr(built.db, "dispose", recorded_dispose)
    await built.start()
    await built.stop()
    assert calls == [
        "a.start",
        "b.start",
        "c.start",
        "c.close",
        "b.close",
        "a.close",
        "db.dispose",
    ]


async def test_a_failing_close_does_not_keep_the_others_open(built: Services) -> None:
    calls: list[str] = []
    probes(built, Probe("a", calls), Probe("b", calls, failing={"close"}), Probe("c", calls))
    await built.stop()
    assert calls == ["c.close", "b.close", "a.close"]


async def test_the_writer_closes_first_and_the_ledger_integrates_after_it(
    settings_factory: Callable[..., Settings],
) -> None:
    """The real order: the writer is the last component, so its queue is flushed before the audit
    component integrates what is pending."""
    svc = Services.build(settings_factory())
    names = [c.name for c in svc.components]
    assert names[-1] == "writer"
    assert names.index("keys") < names.index("audit")
    await svc.db.dispose()


async def test_only_components_whose_counter_moved_reload(built: Services) -> None:
    calls: list[str] = []
    probes(
        built,
        Probe("x", calls, watches=("test-x",)),
        Probe("y", calls, watches=("test-y",)),
        Probe("none", calls),
    )
    seen: dict[str, int] = {}
    await built.refresh_caches(seen)
    calls.clear()
    await built.refresh_caches(seen)
    assert calls == []
    async with built.db.transaction() as conn:
        await generations.bump(conn, "test-y")
    await built.refresh_caches(seen)
    assert calls == ["y.reload"]


async def test_a_failed_reload_is_retried_and_does_not_block_the_others(built: Services) -> None:
    calls: list[str] = []
    failing = Probe("x", calls, watches=("test-x",), failing={"reload"})
    probes(built, failing, Probe("y", calls, watches=("test-y",)))
    seen: dict[str, int] = {}
    await built.refresh_caches(seen)
    calls.clear()
    async with built.db.transaction() as conn:
        await generations.bump(conn, "test-x")
        await generations.bump(conn, "test-y")
    await built.refresh_caches(seen)
    assert calls == ["x.reload", "y.reload"]
    failing.failing.clear()
    calls.clear()
    await built.refresh_caches(seen)
    assert calls == ["x.reload"]  # its counter was kept at the old value: retried
    calls.clear()
    await built.refresh_caches(seen)
    assert calls == []


async def test_maintenance_goes_on_after_a_failing_component(built: Services) -> None:
    calls: list[str] = []
    probes(built, Probe("a", calls, failing={"maintain"}), Probe("b", calls))
    await built.maintenance()
    assert calls == ["a.maintain", "b.maintain"]


def test_every_real_component_has_the_protocol_shape(built: Services) -> None:
    for component in built.components:
        assert isinstance(component, Idle), component
        shaped: Component = component
        assert shaped.name
    assert len({c.name for c in built.components}) == len(built.components)


async def test_shutdown_lets_a_round_finish_and_cancels_one_that_overstays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app_module, "SHUTDOWN_GRACE", 0.5)
    stopping = asyncio.Event()
    finished: list[str] = []
    round_started = asyncio.Event()

    async def polite() -> None:
        round_started.set()
        await stopping.wait()
        await asyncio.sleep(0.05)  # the rest of its round, after being asked to stop
        finished.append("polite")

    async def deaf() -> None:
        await asyncio.Event().wait()

    tasks = [asyncio.create_task(polite()), asyncio.create_task(deaf())]
    await round_started.wait()
    await _stop_tasks(tasks, stopping)
    assert finished == ["polite"]
    assert not tasks[0].cancelled()
    assert tasks[1].cancelled()


async def test_the_sequencer_finishes_the_round_in_progress_when_stopping(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never abandoned inside its transaction: on SQLite a connection dropped mid-write kept the
    write lock, and the shutdown's own integration then waited the whole busy timeout (30 s)."""
    svc = Services.build(settings_factory(audit_integrate_interval=0.01))
    entered, release = asyncio.Event(), asyncio.Event()
    rounds: list[str] = []

    async def slow_round() -> int:
        entered.set()
        await release.wait()
        rounds.append("done")
        return 0

    monkeypatch.setattr(svc.ledger, "integrate_all", slow_round)
    stopping = asyncio.Event()
    task = asyncio.create_task(svc.ledger.run(stopping))
    try:
        await asyncio.wait_for(entered.wait(), 5)
        stopping.set()
        await asyncio.sleep(0.05)
        assert not task.done()  # still in its round
        release.set()
        await asyncio.wait_for(task, 5)
        assert rounds == ["done"]
        assert not task.cancelled()
    finally:
        release.set()
        task.cancel()
        await svc.db.dispose()
