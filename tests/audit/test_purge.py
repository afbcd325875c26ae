"""Retention's purge (``Ledger.purge``, ``Ledger.due``): the payloads of every leaf of a type older
than the type's cutoff go at the next round (a leaf integrated late with an old time included, per
type, ``"*"`` for the rest, re-runs and concurrent purgers), and a round reads what is newly due,
not every leaf purged before (PostgreSQL plans, with and without statistics)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select

from tests.conftest import make_settings
from trustplane.audit.ledger import Ledger
from trustplane.audit.tables import audit_leaves, audit_payloads
from trustplane.storage.db import Database

DAY = 86_400_000
NOW = 1_000 * DAY

Open = Callable[[dict[str, int]], Ledger]


@pytest.fixture
async def open_ledger(db_url: str, tmp_path: Path) -> AsyncIterator[Open]:
    """Ledgers with the given retention periods, each on its own pool (another process's)."""
    dbs: list[Database] = []

    def make(periods: dict[str, int]) -> Ledger:
        db = Database(db_url)
        dbs.append(db)
        settings = make_settings(db_url, tmp_path, audit_retention_days=periods)
        return Ledger(settings, db, bytes(32))

    yield make
    for db in dbs:
        await db.dispose()


async def _add(ledger: Ledger, leaves: list[tuple[int, str, int]]) -> None:
    """Leaves (idx, type, time_ms) with their payloads, as the sequencer writes them."""
    async with ledger._db.transaction() as conn:
        await conn.execute(
            insert(audit_leaves),
            [
                {"idx": i, "entry": "{}", "event_id": f"{i:032x}", "type": t, "time_ms": ms}
                | {"integrated_at": ms}
                for i, t, ms in leaves
            ],
        )
        await conn.execute(
            insert(audit_payloads),
            [{"idx": i, "payload": f"p{i}", "salt": b"s" * 16} for i, _t, _ms in leaves],
        )


async def _kept(ledger: Ledger) -> set[int]:
    async with ledger._db.read() as conn:
        return {int(i) for i in (await conn.execute(select(audit_payloads.c.idx))).scalars()}


async def test_each_type_by_its_period_and_star_for_the_rest(open_ledger: Open) -> None:
    ledger = open_ledger({"x:y:a": 10, "*": 100})
    await _add(
        ledger,
        [
            (0, "x:y:a", NOW - 20 * DAY),  # due
            (1, "x:y:a", NOW - 5 * DAY),
            (2, "x:y:b", NOW - 200 * DAY),  # due ("*")
            (3, "x:y:b", NOW - 50 * DAY),
            (4, "x:y:c", NOW - 150 * DAY),  # due ("*")
            (5, "x:y:c", NOW - 90 * DAY),
        ],
    )
    assert await ledger.due(NOW) == {"x:y:a": 1, "x:y:b": 1, "x:y:c": 1}
    assert await ledger.purge(NOW) == {"x:y:a": 1, "x:y:b": 1, "x:y:c": 1}
    assert await _kept(ledger) == {1, 3, 5}
    # a re-run finds nothing, and is not an event
    assert await ledger.due(NOW) == {"x:y:a": 0, "x:y:b": 0, "x:y:c": 0}
    assert await ledger.purge(NOW) == {}
    assert await _kept(ledger) == {1, 3, 5}
    # time passes: what ages past the cutoff goes, and only that
    assert await ledger.purge(NOW + 6 * DAY) == {"x:y:a": 1}
    assert await ledger.purge(NOW + DAY * 52) == {"x:y:b": 1, "x:y:c": 1}
    assert await _kept(ledger) == set()


async def test_a_leaf_integrated_late_with_an_old_time_is_purged_at_the_next_round(
    open_ledger: Open,
) -> None:
    ledger = open_ledger({"x:y:a": 10, "*": 100})
    await _add(ledger, [(i, "x:y:a", NOW - 30 * DAY + i) for i in range(5)])
    await _add(ledger, [(5, "x:y:b", NOW - 20 * DAY)])
    assert await ledger.purge(NOW) == {"x:y:a": 5}
    await _add(
        ledger,
        [
            (6, "x:y:a", NOW - 400 * DAY),  # late, far older than the last cutoff: due
            (7, "x:y:a", NOW - 11 * DAY),  # late, just before the cutoff: due
            (8, "x:y:a", NOW - DAY),
            (9, "x:y:b", NOW - 101 * DAY),  # late, "*": due
            (10, "x:y:d", NOW - 300 * DAY),  # a new type, late: due
            (11, "x:y:d", NOW - 99 * DAY),
        ],
    )
    assert await ledger.due(NOW) == {"x:y:a": 2, "x:y:b": 1, "x:y:d": 1}
    assert await ledger.purge(NOW) == {"x:y:a": 2, "x:y:b": 1, "x:y:d": 1}
    assert await _kept(ledger) == {5, 8, 11}
    assert await ledger.purge(NOW) == {}


async def test_a_longer_period_keeps_what_is_no_longer_due(open_ledger: Open) -> None:
    """A period made longer moves the cutoff back: a late leaf between the two cutoffs stays until it
    is past the new one, and then goes."""
    short, long = open_ledger({"x:y:a": 10}), open_ledger({"x:y:a": 30})
    await _add(short, [(0, "x:y:a", NOW - 40 * DAY), (1, "x:y:a", NOW - 20 * DAY)])
    assert await short.purge(NOW) == {"x:y:a": 2}
    await _add(
        long, [(2, "x:y:a", NOW - 20 * DAY), (3, "x:y:a", NOW - 40 * DAY), (4, "x:y:a", NOW)]
    )
    assert await long.purge(NOW) == {"x:y:a": 1}
    assert await _kept(long) == {2, 4}
    assert await long.purge(NOW + 15 * DAY) == {"x:y:a": 1}
    assert await _kept(long) == {4}
    assert await short.purge(NOW + 15 * DAY) == {"x:y:a": 1}
    assert await _kept(long) == set()


async def test_concurrent_purgers_purge_each_payload_once(open_ledger: Open) -> None:
    first, second = open_ledger({"*": 10}), open_ledger({"*": 10})
    await _add(first, [(i, ("x:y:a", "x:y:b")[i % 2], NOW - 20 * DAY + i) for i in range(600)])
    await _add(first, [(600, "x:y:a", NOW)])
    counts = await asyncio.gather(first.purge(NOW), second.purge(NOW))
    assert sum(c.get("x:y:a", 0) + c.get("x:y:b", 0) for c in counts) == 600
    assert await _kept(first) == {600}
    await _add(first, [(601 + i, ("x:y:a", "x:y:b")[i % 2], NOW - 30 * DAY) for i in range(100)])
    counts = await asyncio.gather(first.purge(NOW + 1), second.purge(NOW + 1))
    assert sum(c.get("x:y:a", 0) + c.get("x:y:b", 0) for c in counts) == 100
    assert await _kept(first) == {600}
    assert await first.due(NOW + 1) == {"x:y:a": 0, "x:y:b": 0}


def _leaf_rows(plan: dict[str, Any]) -> int:
    """Rows of ``audit_leaves`` a plan node and its children read (returned or filtered out)."""
    rows = 0
    if plan.get("Relation Name") == "audit_leaves":
        loops = int(plan.get("Actual Loops", 1))
        rows += loops * (
            int(plan.get("Actual Rows", 0))
            + int(plan.get("Rows Removed by Filter", 0))
            + int(plan.get("Rows Removed by Index Recheck", 0))
        )
    return rows + sum(_leaf_rows(p) for p in plan.get("Plans", []))


@pytest.mark.postgres
@pytest.mark.parametrize("analyzed", [False, True], ids=["no-statistics", "analyzed"])
async def test_a_round_reads_the_new_leaves_not_the_purged_ones_on_postgresql(
    pg_url: str, tmp_path: Path, analyzed: bool
) -> None:
    """The purge read every leaf of each type older than the cutoff, every minute in every process
    (360-443 ms a type at 1,000,000 leaves with nothing left to delete): here 3,000. After a first
    round, one reads the leaves integrated since (20) and those aged past the cutoff since (3),
    whatever the planner knows."""
    db = Database(pg_url)
    settings = make_settings(pg_url, tmp_path, audit_retention_days={"*": 1})
    ledger = Ledger(settings, db, bytes(32))
    try:
        await _add(ledger, [(i, f"x:y:t{i % 3}", i * 1000) for i in range(6000)])
        now = 3000 * 1000 + DAY
        assert sum((await ledger.purge(now)).values()) == 3000
        await _add(ledger, [(6000 + i, f"x:y:t{i % 3}", now + i) for i in range(19)])
        await _add(ledger, [(6019, "x:y:t1", 5)])  # late
        if analyzed:
            async with db.transaction() as conn:
                await conn.exec_driver_sql("ANALYZE audit_leaves")
                await conn.exec_driver_sql("ANALYZE audit_payloads")
        seen: list[tuple[str, Any]] = []

        def record(_c: Any, _cur: Any, statement: str, parameters: Any, *_a: Any) -> None:
            if "audit_leaves" in statement:
                seen.append((statement, parameters))

        event.listen(db.engine.sync_engine, "before_cursor_execute", record)
        try:
            purged = await ledger.purge(now + 3000)  # leaves 3000-3002 aged past the cutoff
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", record)
        assert purged == {"x:y:t0": 1, "x:y:t1": 2, "x:y:t2": 1}, purged
        read = 0
        async with db.engine.connect() as conn:
            await conn.begin()  # EXPLAIN ANALYZE runs the DELETEs: rolled back
            for statement, parameters in seen:
                result = await conn.exec_driver_sql(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters
                )
                value = result.scalar_one()
                (plan,) = json.loads(value) if isinstance(value, str) else value
                read += _leaf_rows(plan["Plan"])
            await conn.rollback()
    finally:
        await db.dispose()
    assert read < 200, (read, [s for s, _ in seen])
