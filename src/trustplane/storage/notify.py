"""Pushed cache invalidation on PostgreSQL: ``LISTEN``/``NOTIFY`` on the generation counters.

:func:`trustplane.storage.generations.bump` sends ``pg_notify`` on :data:`CHANNEL` inside the writing
transaction; PostgreSQL delivers it to every listener when (and only if) that transaction commits.
Each process keeps one asyncpg connection that ``LISTEN``s (:class:`GenerationListener`) and wakes its
refresh loop (:func:`refresh_loop`), which then reads the counters and reloads what moved, as the poll
does. Polling stays as the fallback: every ``cache_refresh_interval`` seconds while the listening
connection is down (a refresh runs at once when it is lost and again after a reconnect, for what was
missed), every :data:`NOTIFIED_FALLBACK` seconds while it is up (the bound on staleness should a
notification be lost on a connection that looks alive), and it is the only mechanism on SQLite,
which has no notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.storage.db import Database

log = structlog.get_logger(__name__)

#: The channel every process listens on; the payload is the name of the bumped counter.
CHANNEL = "trustplane_generations"
#: How long to wait before opening the listening connection again after it failed or was lost.
RECONNECT_DELAY = 1.0
#: Seconds between the fallback polls of :func:`refresh_loop` while the listener is connected (the
#: push carries every change; an idle process read the counters every second for nothing).
NOTIFIED_FALLBACK = 10.0


async def announce(conn: AsyncConnection, name: str) -> None:
    """Tell the other processes that ``name`` moved, delivered when the caller's transaction commits
    (nothing is sent if it rolls back). A no-op on SQLite."""
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_notify(CHANNEL, name)))


class GenerationListener:
    """One ``LISTEN`` connection per process; :attr:`changed` is set on every notification, after
    every (re)connect and when the connection is lost (:attr:`connected` cleared first, so that a
    waiter woken by the loss sees it). ``channel``: another channel than the generations' (the reference services'
    outbox: ``trustplane.reference.jetstream``); ``changed``: an event of the caller's to set."""

    def __init__(
        self, url: str, channel: str = CHANNEL, changed: asyncio.Event | None = None
    ) -> None:
        parsed = make_url(url)
        self._dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        self.channel = channel
        self.changed = changed if changed is not None else asyncio.Event()
        self.connected = asyncio.Event()

    def _notified(self, *_args: Any) -> None:
        self.changed.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Listen until ``stopping`` is set, reconnecting after :data:`RECONNECT_DELAY` seconds."""
        while not stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._notified)
                self.connected.set()
                self.changed.set()  # what changed while nobody listened is read now
                await _first(stopping.wait(), lost.wait())
                if not stopping.is_set():
                    log.warning("cache_listener_lost", channel=self.channel)
            except Exception as exc:  # the poll covers the gap; try again shortly
                log.warning("cache_listener_failed", error=repr(exc))
            finally:
                if self.connected.is_set():  # the push stops: the poll takes over from now
                    self.connected.clear()
                    self.changed.set()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), RECONNECT_DELAY)


def listener_for(db: Database) -> GenerationListener | None:
    """A listener on PostgreSQL; None on SQLite (polling only)."""
    return None if db.is_sqlite else GenerationListener(db.url)


async def refresh_loop(
    interval: float,
    refresh: Callable[[], Awaitable[None]],
    stopping: asyncio.Event,
    wake: asyncio.Event | None,
    connected: asyncio.Event | None = None,
) -> None:
    """Call ``refresh`` every ``interval`` seconds, and at once whenever ``wake`` is set (notifications
    arriving during a refresh cause one more), until ``stopping`` is set. While ``connected`` (the
    listener's) is set, the poll is every :data:`NOTIFIED_FALLBACK` seconds instead (at least
    ``interval``): the notifications wake the loop, and the listener sets ``wake`` when it is lost."""
    while True:
        waits = [stopping.wait()] + ([wake.wait()] if wake is not None else [])
        pushed = connected is not None and connected.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                _first(*waits), max(interval, NOTIFIED_FALLBACK) if pushed else interval
            )
        if stopping.is_set():
            return
        if wake is not None:
            wake.clear()
        try:
            await refresh()
        except Exception as exc:  # keep the loop alive; the failure is logged and retried
            log.error("background_task_failed", task="cache", error=repr(exc))


async def _first(*waits: Awaitable[Any]) -> None:
    """Return when the first of ``waits`` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
