"""The connections a store holds for its one-statement calls on PostgreSQL
(``reference/driver_connections.py``): no pool checkout per statement, dropped when the server
ended them or a statement was cancelled on them, bounded (the rest through the pool), and
terminated with the engine."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url

from tests.reference.conftest import ORDER, fresh_store
from trustplane.reference import driver_connections, machine, store_pg
from trustplane.reference.driver_connections import DriverConnections, connections_of
from trustplane.reference.events import Envelope
from trustplane.reference.store import DuplicateTransition, TradeStore

pytestmark = pytest.mark.postgres


def _envelope() -> Envelope:
    return Envelope(
        "txn-1", "alice", "desk-app", ({"sub": "arranger-svc"},), {"id": "M-1", "version": 1},
        "digest", ("d-1",), "bundle-7",
    )  # fmt: skip


def _checkouts(store: TradeStore) -> list[str]:
    """Every checkout of either engine's pool from now on."""
    seen: list[str] = []
    for name, engine in (("engine", store.db.engine), ("autocommit", store.db.autocommit_engine)):
        event.listen(engine.sync_engine, "checkout", lambda *_a, n=name: seen.append(n))
    return seen


def _opened(store: TradeStore) -> list[asyncpg.Connection]:
    """Every connection the store opens for its statements from now on."""
    opened: list[asyncpg.Connection] = []
    connections_of(store.db).opened.append(opened.append)
    return opened


async def test_a_step_s_statements_check_nothing_out_of_the_pools(pg_database: str) -> None:
    """A creation, a transition, the trade read and the outbox read: one held connection, reused,
    and no checkout of either pool (before: one checkout of the autocommit pool per statement)."""
    store = await fresh_store(pg_database)
    try:
        await store.create("T-0", ORDER, "alice", _envelope(), None)  # the functions' first call
        seen, opened = _checkouts(store), _opened(store)
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        await store.apply("T-1", machine.EXECUTE, "broker", _envelope(), None)
        assert (await store.trade("T-1")).state == machine.EXECUTED
        assert [e.trade_id for e in await store.events_after(0)] == ["T-0", "T-1", "T-1"]
        assert seen == []
        assert opened == []  # the one opened by the first call, reused
        assert connections_of(store.db).open_count == 1
    finally:
        await store.db.dispose()


async def test_the_held_connections_end_with_the_engine(pg_database: str) -> None:
    store = await fresh_store(pg_database)
    opened = _opened(store)
    await store.create("T-1", ORDER, "alice", _envelope(), None)
    (first,) = opened
    await store.db.dispose()
    assert first.is_closed()
    assert connections_of(store.db).open_count == 0
    try:  # the store goes on, on a new connection
        assert (await store.trade("T-1")).state == machine.CREATED
        assert len(opened) == 2
        assert not opened[1].is_closed()
    finally:
        await store.db.dispose()
    assert opened[1].is_closed()


async def test_a_connection_the_server_ended_is_replaced(pg_database: str) -> None:
    """The held connection's backend terminated by another session while it is idle: the next
    statement runs on a new connection, and the dead one is not kept."""
    store = await fresh_store(pg_database)
    opened = _opened(store)
    try:
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        (first,) = opened
        dsn = make_url(pg_database).set(drivername="postgresql")
        other = await asyncpg.connect(dsn.render_as_string(hide_password=False))
        try:
            await other.execute("SELECT pg_terminate_backend($1)", first.get_server_pid())
        finally:
            await other.close()
        for _ in range(100):  # the driver notices the close on one of the loop's next turns
            if first.is_closed():
                break
            await asyncio.sleep(0.01)
        assert (await store.trade("T-1")).state == machine.CREATED
        assert len(opened) == 2
        assert connections_of(store.db).open_count == 1
    finally:
        await store.db.dispose()


async def test_a_statement_cancelled_mid_flight_drops_its_connection(pg_database: str) -> None:
    store = await fresh_store(pg_database)
    opened = _opened(store)
    try:
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await store_pg.fetch(store.db, "SELECT pg_sleep(5)", ())
        (first,) = opened
        assert first.is_closed()  # never lent again with a statement in flight
        assert (await store.trade("T-1")).state == machine.CREATED
        assert len(opened) == 2
    finally:
        await store.db.dispose()


async def test_a_refused_statement_leaves_its_connection_held(pg_database: str) -> None:
    store = await fresh_store(pg_database)
    opened = _opened(store)
    try:
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        with pytest.raises(asyncpg.PostgresError):
            await store_pg.fetch(store.db, "SELECT 1/0", ())
        with pytest.raises(DuplicateTransition):  # a unique violation: the trade created already
            await store.create("T-1", ORDER, "alice", _envelope(), None)
        assert (await store.trade("T-1")).state == machine.CREATED
        assert len(opened) == 1
        assert not opened[0].is_closed()
    finally:
        await store.db.dispose()


async def test_statements_beyond_the_held_connections_wait_for_one(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every held connection lent, a statement waits for one given back, as a checkout
    waited for the pool's: never more connections than the pool's bound (a first version went to
    the pool at once, twice the connections, and met PostgreSQL's ``max_connections``)."""
    monkeypatch.setattr(driver_connections, "HELD", 2)
    store = await fresh_store(pg_database)
    try:
        await store_pg.fetch(store.db, "SELECT 1", ())
        seen = _checkouts(store)
        rows: list[Any] = await asyncio.gather(
            *(store_pg.fetch(store.db, "SELECT $1::int, pg_sleep(0.1)", (i,)) for i in range(5))
        )
        assert [r[0][0] for r in rows] == [0, 1, 2, 3, 4]
        assert connections_of(store.db).open_count == 2
        assert seen == []
    finally:
        await store.db.dispose()


async def test_a_connection_handed_to_a_cancelled_waiter_goes_to_the_next(
    pg_database: str,
) -> None:
    store = await fresh_store(pg_database)
    held = DriverConnections(store.db, 1)
    try:
        lent = await held.take()
        first = asyncio.create_task(held.take())
        second = asyncio.create_task(held.take())
        await asyncio.sleep(0)  # both wait
        assert lent is not None
        held.give(lent)  # handed to the first waiter...
        first.cancel()  # ...cancelled before it could run
        assert await second is lent
        assert first.cancelled()
        assert held.open_count == 1
    finally:
        await store.db.dispose()


async def test_the_engine_s_disposal_lets_the_waiting_statements_go_on(pg_database: str) -> None:
    store = await fresh_store(pg_database)
    held = DriverConnections(store.db, 1)
    try:
        lent = await held.take()
        waiting = asyncio.create_task(held.take())
        await asyncio.sleep(0)
        await store.db.dispose()  # terminates the lent one, frees its slot
        fresh = await waiting
        assert lent is not None
        assert lent.is_closed()
        assert fresh is not None
        assert fresh is not lent
        assert await fresh.fetchval("SELECT 1") == 1
    finally:
        await store.db.dispose()
