"""Pushed cache invalidation (trustplane.storage.notify): a bumped generation notifies the listeners
of every process when its transaction commits, never when it rolls back; the refresh loop runs at
once when woken, and on its interval without a wake-up (the SQLite path)."""

from __future__ import annotations

import asyncio

import pytest

from trustplane.storage import generations, notify
from trustplane.storage.db import Database


class Rollback(Exception):
    pass


@pytest.mark.postgres
async def test_commit_notifies_rollback_does_not(pg_url: str) -> None:
    db = Database(pg_url)
    listener = notify.GenerationListener(db.url)
    stopping = asyncio.Event()
    task = asyncio.create_task(listener.run(stopping))
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        await asyncio.wait_for(listener.changed.wait(), 1)  # set on connect: catch up at once
        listener.changed.clear()

        async def bump_then_fail() -> None:
            async with db.transaction() as conn:
                await generations.bump(conn, "clients")
                raise Rollback

        with pytest.raises(Rollback):
            await bump_then_fail()
        await asyncio.sleep(0.3)
        assert not listener.changed.is_set()

        async with db.transaction() as conn:
            await generations.bump(conn, "clients")
            await asyncio.sleep(0.2)
            assert not listener.changed.is_set()  # delivered at commit, not before
        await asyncio.wait_for(listener.changed.wait(), 2)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
        await db.dispose()
    assert not listener.connected.is_set()


@pytest.mark.postgres
async def test_listener_reconnects_after_the_connection_is_killed(pg_url: str) -> None:
    db = Database(pg_url)
    listener = notify.GenerationListener(db.url)
    stopping = asyncio.Event()
    task = asyncio.create_task(listener.run(stopping))
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        await asyncio.wait_for(listener.changed.wait(), 10)  # the connect's own wake-up
        listener.changed.clear()
        async with db.transaction() as conn:
            await conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE $1 AND datname = current_database()",
                (f"LISTEN%{notify.CHANNEL}%",),
            )
        # lost: a refresh at once, with ``connected`` cleared (the refresh loop polls again)
        await asyncio.wait_for(listener.changed.wait(), 10)
        assert not listener.connected.is_set()
        listener.changed.clear()
        # connected again after RECONNECT_DELAY; the reconnect itself wakes a refresh
        await asyncio.wait_for(listener.changed.wait(), notify.RECONNECT_DELAY + 10)
        assert listener.connected.is_set()
        listener.changed.clear()
        async with db.transaction() as conn:
            await generations.bump(conn, "keys")
        await asyncio.wait_for(listener.changed.wait(), 2)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
        await db.dispose()


@pytest.mark.parametrize("woken", [True, False])
async def test_refresh_loop(woken: bool) -> None:
    calls: list[float] = []
    stopping, wake = asyncio.Event(), asyncio.Event()

    async def refresh() -> None:
        calls.append(asyncio.get_running_loop().time())

    interval = 30.0 if woken else 0.05
    task = asyncio.create_task(
        notify.refresh_loop(interval, refresh, stopping, wake if woken else None)
    )
    await asyncio.sleep(0.01)
    if woken:
        wake.set()
    await asyncio.sleep(0.3)
    stopping.set()
    await asyncio.wait_for(task, 2)
    assert calls, "refreshed"
    if woken:
        assert len(calls) == 1
        assert not wake.is_set()
    else:
        assert len(calls) >= 3


async def test_refresh_loop_polls_rarely_while_the_push_is_connected() -> None:
    """While the listener is connected the fallback poll is every NOTIFIED_FALLBACK seconds, not
    every ``interval`` (an idle process read the counters every second); a wake still refreshes at
    once, and once the connection is lost (``connected`` cleared, ``wake`` set) the interval
    applies again."""
    calls: list[float] = []
    stopping, wake, connected = asyncio.Event(), asyncio.Event(), asyncio.Event()
    connected.set()

    async def refresh() -> None:
        calls.append(asyncio.get_running_loop().time())

    task = asyncio.create_task(notify.refresh_loop(0.02, refresh, stopping, wake, connected))
    await asyncio.sleep(0.3)
    assert calls == []  # 15 intervals, no poll
    wake.set()
    await asyncio.sleep(0.1)
    assert len(calls) == 1
    connected.clear()
    wake.set()  # the listener's loss
    await asyncio.sleep(0.3)
    stopping.set()
    await asyncio.wait_for(task, 2)
    assert len(calls) >= 4  # the loss's refresh, then the interval's polls


async def test_sqlite_has_no_listener_and_bump_still_counts(sqlite_url: str) -> None:
    """SQLite: no notifications (polling only); bump counts as before, the announce is a no-op."""
    db = Database(sqlite_url)
    try:
        assert notify.listener_for(db) is None
        async with db.transaction() as conn:
            await generations.bump(conn, "clients")
            await generations.bump(conn, "clients")
        async with db.read() as conn:
            assert (await generations.read_all(conn))["clients"] == 2
    finally:
        await db.dispose()
