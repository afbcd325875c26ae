"""Cursors over the stores' ``seq`` columns never skip a committed event (docs/settlement.md,
"Stores"): the dispatcher follows each upstream outbox with a cursor, a reporting client follows
the reporting store's feed (its inbox) with one. On PostgreSQL a transaction takes its ``seq`` from
a sequence when it inserts, and transactions commit in another order than they took their
numbers; the stores make commit order equal ``seq`` order (an advisory lock per table, held from
the insert to the commit). SQLite has one writer: it never had the gap."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from tests.reference.conftest import ORDER, SplitWorld, split_stores, upstreams
from trustplane.reference import machine, store_pg
from trustplane.reference.events import Envelope
from trustplane.reference.handoff import Dispatcher, learn_verified
from trustplane.reference.services import ServiceStores
from trustplane.reference.store import TradeStore
from trustplane.storage.db import Database

ENVELOPE = Envelope("txn-1", "alice", "desk-app")
#: The racing test: trades created (and executed), WRITERS at once, while DISPATCHERS hand off
#: (the writers' connections stay well within a shared server's ``max_connections``).
TRADES, WRITERS, DISPATCHERS = 32, 8, 2


class HeldOpen:
    """The next transaction of ``db``: its statements run, then it waits before its commit until
    :attr:`release` is set (:attr:`ran` says it got there)."""

    def __init__(self, db: Database) -> None:
        self._transaction = db.transaction
        self.ran, self.release = asyncio.Event(), asyncio.Event()
        self._armed = True

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        hold, self._armed = self._armed, False
        async with self._transaction() as conn:
            yield conn
            if hold:
                self.ran.set()
                await self.release.wait()


def slow_commits(db: Database, seed: int) -> None:
    """Every transaction of ``db`` waits 0 to 5 ms after its statements, before its commit (as an
    fsync or a descheduled process would): transactions commit in another order than they ran."""
    transaction, rng = db.transaction, random.Random(seed)

    @asynccontextmanager
    async def slow() -> AsyncIterator[AsyncConnection]:
        async with transaction() as conn:
            yield conn
            await asyncio.sleep(rng.random() * 0.005)

    db.transaction = slow  # type: ignore[method-assign]


async def _in_a_transaction(db: Database, sql: str, params: tuple[Any, ...]) -> Any:
    """``store_pg``'s one statement (an owner's transition, a learn) in ``db.transaction()``: the
    function's own statements, lock and insert, held open or slowed before the commit like the
    SQLAlchemy transactions above (the statement alone commits as soon as it ran)."""
    async with db.transaction() as conn:
        await conn.exec_driver_sql("SELECT 1")  # the transaction begins (SQLAlchemy is lazy)
        driver: Any = (await conn.get_raw_connection()).driver_connection
        try:
            return await driver.fetchrow(sql, *params)
        except asyncpg.exceptions.UniqueViolationError:
            raise store_pg.Duplicate() from None


@pytest.fixture(autouse=True)
def statements_held_with_transactions(monkeypatch: pytest.MonkeyPatch) -> None:
    """:class:`HeldOpen` and :func:`slow_commits` reach the one-statement writes too."""
    monkeypatch.setattr(store_pg, "_fetchrow", _in_a_transaction)


@pytest.fixture
async def pg_stores(pg_service_databases: dict[str, str]) -> AsyncIterator[ServiceStores]:
    stores = await split_stores(pg_service_databases)
    yield stores
    for store in stores.distinct():
        await store.db.dispose()


async def waiting_on_a_lock(db: Database) -> bool:
    """Whether a session of ``db``'s database waits for a lock (PostgreSQL)."""
    async with db.read() as conn:
        found = await conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
        )
        return bool(found.scalar())


async def blocked_or_done(task: asyncio.Task[Any], db: Database) -> None:
    """Until ``task`` committed, or waits behind the held transaction (fixed stores)."""
    async with asyncio.timeout(30):  # a guard against a hang, never reached when it works
        while not await waiting_on_a_lock(db):
            done, _ = await asyncio.wait({task}, timeout=0.01)
            if done:
                return


async def overtaken(
    store: TradeStore, first: Callable[[], Awaitable[Any]], second: Callable[[], Awaitable[Any]]
) -> tuple[asyncio.Task[Any], asyncio.Task[Any], HeldOpen]:
    """``first`` appends (takes the lower ``seq``) and is held open before its commit; ``second``
    appends after it and commits (or, fixed, waits for ``first``)."""
    held = HeldOpen(store.db)
    store.db.transaction = held.transaction  # type: ignore[method-assign]
    one = asyncio.create_task(first())
    await held.ran.wait()
    two = asyncio.create_task(second())
    await blocked_or_done(two, store.db)
    return one, two, held


@pytest.mark.postgres
async def test_an_event_committed_after_a_later_one_is_still_handed_off(
    pg_stores: ServiceStores,
) -> None:
    """The lifecycle bench's lost trade ("propose: 404 ... no trade"): two creates at execution,
    the first commits last; a hand-off between the two commits must not move the cursor past the
    first."""
    execution, allocation = pg_stores.execution, pg_stores.allocation
    dispatcher = Dispatcher.between({machine.ALLOCATION: allocation}, upstreams(pg_stores)[:1])

    def create(trade_id: str) -> Callable[[], Awaitable[Any]]:
        return lambda: execution.create(trade_id, ORDER, "alice", ENVELOPE, None)

    first, second, held = await overtaken(execution, create("t-first"), create("t-second"))
    await dispatcher.hand_off(machine.EXECUTION)  # between the two commits
    held.release.set()
    await asyncio.gather(first, second)
    await dispatcher.hand_off(machine.EXECUTION)
    for trade_id in ("t-first", "t-second"):
        assert (await allocation.trade(trade_id)).state == machine.CREATED, trade_id


@pytest.mark.postgres
async def test_the_feed_never_skips_an_event_learned_after_a_later_one(
    pg_stores: ServiceStores,
) -> None:
    """The reporting service's ``GET /events`` follows its inbox with the client's cursor: an
    event whose learning commits after a later one's must still come after the cursor."""
    execution, reporting = pg_stores.execution, pg_stores.reporting
    upstream = upstreams(pg_stores)[0]
    for trade_id in ("t-first", "t-second"):
        await execution.create(trade_id, ORDER, "alice", ENVELOPE, None)
    one, two = await execution.events_after(0)

    def learn(jws: str) -> Callable[[], Awaitable[Any]]:
        return lambda: learn_verified(reporting, jws, upstream)

    first, second, held = await overtaken(reporting, learn(one.jws), learn(two.jws))
    seen = await reporting.feed_after(0)  # a client's poll between the two commits
    cursor = seen[-1].seq if seen else 0
    held.release.set()
    await asyncio.gather(first, second)
    seen += await reporting.feed_after(cursor)
    assert sorted(e.event_id for e in seen) == sorted([one.event_id, two.event_id])


async def test_racing_writers_and_dispatchers_lose_no_event(split: SplitWorld) -> None:
    """Many transitions at once in one store, committing in another order than they took their
    ``seq``, while dispatchers hand off in parallel (as several processes' services and sweeps
    do): every event is learned by every downstream store exactly once."""
    stores, writers = split.stores, asyncio.Semaphore(WRITERS)
    execution = stores.execution
    slow_commits(execution.db, 1)
    routes = upstreams(stores)[:1]
    dispatchers = [Dispatcher.between(stores.by_service(), routes) for _ in range(DISPATCHERS)]
    writing = True

    async def dispatch(dispatcher: Dispatcher) -> None:
        while writing:
            await dispatcher.hand_off(machine.EXECUTION)
            await asyncio.sleep(0)

    async def trade(i: int) -> None:
        async with writers:
            await execution.create(f"t-{i}", ORDER, "alice", ENVELOPE, None)
            await execution.apply(f"t-{i}", machine.EXECUTE, "broker", ENVELOPE, None)

    background = [asyncio.create_task(dispatch(d)) for d in dispatchers]
    await asyncio.gather(*(trade(i) for i in range(TRADES)))
    writing = False
    await asyncio.gather(*background)
    await dispatchers[0].hand_off(machine.EXECUTION)  # what the last sweep finds after the cursors

    events = sorted(e.event_id for e in await execution.events_after(0, 10_000))
    assert len(events) == 2 * TRADES
    for service in (machine.ALLOCATION, machine.SETTLEMENT, machine.REPORTING):
        store = stores.by_service()[service]
        assert sorted(e.event_id for e in await store.feed_after(0, 10_000)) == events, service
        for i in range(TRADES):
            history = [r.transition for r in await store.history(f"t-{i}")]
            assert history == ["create", "execute"], (service, i)
        assert await store.pending() == []


async def test_racing_learns_and_a_feed_reader_lose_no_event(split: SplitWorld) -> None:
    """Many events learned at once by the reporting store, committing in another order than they
    took their inbox ``seq``, while a client follows ``GET /events`` with its cursor: the client
    reads every event exactly once."""
    stores, writers = split.stores, asyncio.Semaphore(WRITERS)
    upstream = upstreams(stores)[0]
    for i in range(TRADES):
        await stores.execution.create(f"t-{i}", ORDER, "alice", ENVELOPE, None)
    events = await stores.execution.events_after(0, 10_000)
    slow_commits(stores.reporting.db, 2)
    learning, feed = True, []

    async def follow(cursor: int = 0) -> int:
        while learning:
            cursor = await read_feed(cursor)
            await asyncio.sleep(0)
        return cursor

    async def read_feed(cursor: int) -> int:
        for event in await stores.reporting.feed_after(cursor, 1000):
            feed.append(event.event_id)
            cursor = event.seq
        return cursor

    async def learn(jws: str) -> None:
        async with writers:
            await learn_verified(stores.reporting, jws, upstream)

    follower = asyncio.create_task(follow())
    await asyncio.gather(*(learn(e.jws) for e in events))
    learning = False
    await read_feed(await follower)
    assert sorted(feed) == sorted(e.event_id for e in events)
