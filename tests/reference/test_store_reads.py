"""The store's statements on PostgreSQL: a single-statement read is one statement on the wire, with
no transaction around it (``BEGIN`` and ``ROLLBACK`` would be two more round trips); an owner's
transition (or creation) and the learning of an upstream event are one statement each too
(``reference/store_pg.py``: eleven round trips per learn and six per transition before)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event

from tests.reference.conftest import EVENTS_ISSUER, ORDER, fresh_store, split_stores
from trustplane.reference import machine, store_pg
from trustplane.reference.driver_connections import connections_of
from trustplane.reference.events import Envelope, verify_event
from trustplane.reference.store import APPLIED, KNOWN, DuplicateTransition, NotFound, TradeStore
from trustplane.storage.db import Database


def _wire(db: Database) -> list[str]:
    """Every statement sent from now on, on either engine and on the connections the store holds
    for its one-statement calls (its first 40 characters, upper-cased): SQLAlchemy's statements,
    and what asyncpg sends on its own (its query logger on the new connections): ``BEGIN`` and
    ``ROLLBACK``, which SQLAlchemy's cursor events do not see."""
    sent: list[str] = []

    def log(query: str) -> None:
        sent.append(" ".join(query.split()).upper()[:40])

    def connected(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.driver_connection.add_query_logger(lambda record: log(record.query))

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        log(statement)

    for engine in (db.engine, db.autocommit_engine):
        event.listen(engine.sync_engine, "connect", connected)
        event.listen(engine.sync_engine, "before_cursor_execute", executed)
    connections_of(db).opened.append(lambda conn: conn.add_query_logger(lambda r: log(r.query)))
    return sent


def _envelope() -> Envelope:
    return Envelope(
        "txn-1", "alice", "desk-app", ({"sub": "arranger-svc"},), {"id": "M-1", "version": 1},
        "digest", ("d-1",), "bundle-7",
    )  # fmt: skip


async def _created_and_executed(owner: TradeStore) -> tuple[list[Any], list[tuple[Any, str]]]:
    """T-1 created and executed at its owner: the owner's events, and each verified with its JWS
    (what a learning store is handed)."""
    await owner.create("T-1", ORDER, "alice", _envelope(), None)
    await owner.apply("T-1", machine.EXECUTE, "broker", _envelope(), None)
    events = await owner.events_after(0)
    jwks = owner.signer.jwks()
    return events, [(verify_event(e.jws, jwks, issuer=EVENTS_ISSUER), e.jws) for e in events]


async def _counted_store(pg_database: str) -> tuple[TradeStore, list[str]]:
    store = await fresh_store(pg_database)
    await store.db.dispose()  # the pools start empty: every connection from here is logged
    return store, _wire(store.db)


async def _clear(sent: list[str]) -> None:
    """Forget what was sent so far, once its loggers ran (as in :func:`_words`)."""
    await asyncio.sleep(0)
    sent.clear()


async def _words(sent: list[str]) -> list[str]:
    """The first word of each statement sent. asyncpg calls its query loggers on the loop's next
    turn (``call_soon``): one turn is let pass first, or the last statement may not be logged yet
    (the store's connection goes back to the pool without awaiting anything)."""
    await asyncio.sleep(0)
    return [s.split()[0].rstrip(";") for s in sent]


@pytest.mark.postgres
async def test_a_single_statement_read_is_one_statement_without_a_transaction(
    pg_database: str,
) -> None:
    store, sent = await _counted_store(pg_database)
    try:
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        for read in (
            lambda: store.trade("T-1"),
            lambda: store.history("T-1"),
            lambda: store.events_after(0),
            lambda: store.unpublished(),
            lambda: store.cursor("upstream"),
            lambda: store.last_seq(),
        ):
            await _clear(sent)
            await read()
            assert await _words(sent) == ["SELECT"]
    finally:
        await store.db.dispose()


@pytest.mark.postgres
async def test_a_creation_is_one_statement_and_does_not_read_the_trade_back(
    pg_database: str,
) -> None:
    store, sent = await _counted_store(pg_database)
    try:
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        assert await _words(sent) == ["SELECT"]
        assert not any("FROM REF_TRADES" in s for s in sent)
    finally:
        await store.db.dispose()


@pytest.mark.postgres
async def test_an_owner_s_transition_is_one_statement(pg_database: str) -> None:
    """The compare-and-set, the transition row and the outbox row (under its append lock) in one
    statement; a duplicate is that statement and the read of what happened, and names it."""
    store, sent = await _counted_store(pg_database)
    try:
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        await _clear(sent)
        await store.apply("T-1", machine.EXECUTE, "alice", _envelope(), "k-1")
        assert await _words(sent) == ["SELECT"]
        await _clear(sent)
        with pytest.raises(DuplicateTransition) as refused:
            await store.apply("T-1", machine.EXECUTE, "bob", _envelope(), "k-2")
        assert await _words(sent) == ["SELECT", "SELECT"]
        assert (refused.value.record.actor, refused.value.record.idempotency_key) == (
            "alice",
            "k-1",
        )
        history = await store.history("T-1")
        assert [t.transition for t in history] == ["create", "execute"]
        assert [e.type for e in await store.events_after(0)] == ["order.created", "trade.executed"]
    finally:
        await store.db.dispose()


@pytest.mark.postgres
async def test_learning_an_event_is_one_statement(pg_service_databases: dict[str, str]) -> None:
    """Applied with the cursor moved, then redelivered (known): one statement each."""
    stores = await split_stores(pg_service_databases)
    owner, downstream = stores.execution, stores.allocation
    try:
        await owner.create("T-1", ORDER, "alice", _envelope(), None)
        (event,) = await owner.events_after(0)
        claims = verify_event(event.jws, owner.signer.jwks(), issuer=EVENTS_ISSUER)
        await downstream.advance("execution", 0)
        await downstream.db.dispose()
        sent = _wire(downstream.db)
        assert await downstream.learn_through(claims, event.jws, "execution", event.seq) == (
            APPLIED,
            event.seq,
        )
        assert await _words(sent) == ["SELECT"]
        await _clear(sent)
        assert await downstream.learn(claims, event.jws) == KNOWN
        assert await _words(sent) == ["SELECT"]
        assert (await downstream.trade("T-1")).state == machine.CREATED
        assert [e.event_id for e in await downstream.feed_after(0)] == [event.event_id]
        assert await downstream.cursor("execution") == event.seq
    finally:
        for store in stores.distinct():
            await store.db.dispose()


@pytest.mark.postgres
async def test_learning_several_events_is_one_statement(
    pg_service_databases: dict[str, str],
) -> None:
    """A creation and the step after it, with the cursor moved past both: one statement (one
    commit), each outcome as if learned one by one; again: known, one statement."""
    stores = await split_stores(pg_service_databases)
    owner, downstream = stores.execution, stores.allocation
    try:
        events, learning = await _created_and_executed(owner)
        await downstream.advance("execution", 0)
        await downstream.db.dispose()
        sent = _wire(downstream.db)
        last = events[-1].seq
        assert await downstream.learn_all(learning, "execution", last) == ([APPLIED] * 2, last)
        assert await _words(sent) == ["SELECT"]
        # redelivered (the cursor there already: it looks on its own, as learn_through does)
        assert await downstream.learn_all(learning, "execution", last) == ([KNOWN] * 2, last)
        assert (await downstream.trade("T-1")).state == machine.EXECUTED
        history = [r.transition for r in await downstream.history("T-1")]
        assert history == ["create", "execute"]
        assert [e.event_id for e in await downstream.feed_after(0)] == [e.event_id for e in events]
        assert await downstream.cursor("execution") == last
    finally:
        for store in stores.distinct():
            await store.db.dispose()


@pytest.mark.postgres
async def test_several_events_racing_a_delivery_are_learned_one_by_one(
    pg_service_databases: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement for several events hit a unique constraint (a racing delivery): nothing of
    it was written, and each is learned on its own, with the same outcomes."""
    stores = await split_stores(pg_service_databases)
    owner, downstream = stores.execution, stores.settlement
    try:
        events, learning = await _created_and_executed(owner)
        assert await downstream.learn(*learning[0]) == APPLIED  # the racing delivery

        async def raced(*_args: Any) -> Any:
            raise store_pg.Duplicate()

        monkeypatch.setattr(store_pg, "learn_all", raced)
        last = events[-1].seq
        assert await downstream.learn_all(learning, "execution", last) == ([KNOWN, APPLIED], last)
        assert (await downstream.trade("T-1")).state == machine.EXECUTED
        assert await downstream.cursor("execution") == last
    finally:
        for store in stores.distinct():
            await store.db.dispose()


async def test_the_created_trade_is_the_stored_one(ref_url: str) -> None:
    """What :meth:`TradeStore.create` returns, built from what it inserted, equals a read."""
    store = await fresh_store(ref_url)
    try:
        created, _record = await store.create("T-1", ORDER, "alice", _envelope(), None)
        assert created == await store.trade("T-1")
        assert created.state == machine.CREATED
        assert created.envelope["act"] == [{"sub": "arranger-svc"}]
    finally:
        await store.db.dispose()


@pytest.mark.postgres
async def test_the_hot_reads_go_straight_to_asyncpg(pg_database: str) -> None:
    """The trade read before every step and the outbox read after every commit (the hand-off):
    one statement on the wire, none through SQLAlchemy's compilation and cursor layers."""
    store, sent = await _counted_store(pg_database)
    compiled: list[str] = []

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        compiled.append(statement)

    event.listen(store.db.autocommit_engine.sync_engine, "before_cursor_execute", executed)
    try:
        created, _record = await store.create("T-1", ORDER, "alice", _envelope(), None)
        for read, expected in (
            (lambda: store.trade("T-1"), created),
            (lambda: store.events_after(0, 10), None),
        ):
            await _clear(sent)
            found = await read()
            assert (await _words(sent), compiled) == (["SELECT"], [])
            if expected is not None:
                assert found == expected
        (stored,) = await store.events_after(0, 10)
        assert (stored.type, stored.trade_id, stored.published) == ("order.created", "T-1", False)
        assert await store.events_after(stored.seq) == []
        with pytest.raises(NotFound):
            await store.trade("T-2")
    finally:
        await store.db.dispose()


@pytest.mark.postgres
async def test_the_publisher_s_round_goes_straight_to_asyncpg(pg_database: str) -> None:
    """Each publisher round reads the unpublished rows and marks what JetStream acked: one
    statement each on the wire (the mark had ``BEGIN`` and ``COMMIT`` around it), none through
    SQLAlchemy's compilation and cursor layers; the mark stays conditional."""
    store, sent = await _counted_store(pg_database)
    compiled: list[str] = []

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        compiled.append(statement)

    for engine in (store.db.engine, store.db.autocommit_engine):
        event.listen(engine.sync_engine, "before_cursor_execute", executed)
    try:
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        await store.apply("T-1", machine.EXECUTE, "alice", _envelope(), None)
        await store.mark_published([10**6])  # asyncpg's first look at the array type, once
        await _clear(sent)
        compiled.clear()
        found = await store.unpublished(10)
        assert [e.type for e in found] == ["order.created", "trade.executed"]
        assert (await _words(sent), compiled) == (["SELECT"], [])
        await _clear(sent)
        await store.mark_published([found[0].seq])
        assert (await _words(sent), compiled) == (["SELECT"], [])  # store_pg.MARK_FUNCTION
        first = (await store.events_after(0))[0]
        assert first.published
        await store.mark_published([found[0].seq, found[1].seq])  # the first stays as marked
        assert [e.event_id for e in await store.unpublished(10)] == []
        assert (await store.events_after(0))[0] == first
    finally:
        await store.db.dispose()


@pytest.mark.postgres
async def test_the_last_round_s_mark_goes_with_the_next_read_in_one_statement(
    pg_database: str,
) -> None:
    """A woken publisher's round marks what the last one published and reads what is left: one
    statement (the mark's function: its ``UPDATE`` then its ``SELECT``), one commit; the rows it
    marks are not read again (the SELECT sees the UPDATE), and the mark stays conditional."""
    store, sent = await _counted_store(pg_database)
    try:
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        await store.apply("T-1", machine.EXECUTE, "alice", _envelope(), None)
        await store.mark_published([10**6])  # asyncpg's first look at the array type, once
        first, second = await store.unpublished(10)
        await store.mark_published([first.seq])
        marked = (await store.events_after(0))[0]
        await _clear(sent)
        assert [e.seq for e in await store.mark_then_unpublished([second.seq], 10)] == []
        assert await _words(sent) == ["SELECT"]  # store_pg.MARK_FUNCTION
        assert [e.published for e in await store.events_after(0)] == [True, True]
        assert (await store.events_after(0))[0] == marked  # already marked: left as it was
        await store.apply("T-1", machine.PROPOSE, "alice", _envelope(), None)
        found = await store.mark_then_unpublished([], 10)
        assert [e.type for e in found] == ["allocation.proposed"]
    finally:
        await store.db.dispose()


@pytest.mark.postgres
async def test_a_one_statement_call_takes_the_pool_s_connection_without_an_async_connection(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``store_pg``'s statements check the autocommit pool's connection out as it is (the same
    pool and connections), not wrapped in SQLAlchemy's ``AsyncConnection``: about half the CPU
    of a call's checkout and return."""
    store = await fresh_store(pg_database)
    try:
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        engine = store.db.autocommit_engine
        wrapped: list[str] = []
        real = type(engine).connect

        def connect(self: Any) -> Any:
            wrapped.append("connect")
            return real(self)

        monkeypatch.setattr(type(engine), "connect", connect)
        assert (await store.trade("T-1")).state == machine.CREATED
        assert [e.trade_id for e in await store.events_after(0)] == ["T-1"]
        assert wrapped == []
    finally:
        await store.db.dispose()
