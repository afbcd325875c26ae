"""What the stores write per event, and what an older store is upgraded to: no index that no query
reads (the outbox's by trade and by txn), the inbox's kept events found by a partial index that an
event applied on arrival writes nothing into, the outbox's rows not yet published or in the ledger
by partial indexes that a row leaves when it is marked (the full indexes on ``published_at`` and
``ledger_at`` took an entry for every row version); and the PostgreSQL transition function's look for a
retry of its own committed call kept where a retry can succeed or fail again (a creation, a move
onto its own state: ``amend#n``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import inspect, select, text

from tests.reference.conftest import ORDER, fresh_store
from tests.reference.test_store_reads import _envelope
from trustplane.reference import machine, store_pg
from trustplane.reference.store import (
    APPEND_LOCKS,
    INBOX_KEY,
    DuplicateTransition,
    TradeStore,
    outbox,
)
from trustplane.storage.db import Database

#: The indexes of a store made before 2026-12-06 (``create_all`` of that schema).
OLD_INDEXES = {
    "ix_ref_outbox_trade_id": "ref_outbox (trade_id)",
    "ix_ref_outbox_txn": "ref_outbox (txn)",
    "ix_ref_inbox_trade_id": "ref_inbox (trade_id)",
    "ix_ref_inbox_applied_at": "ref_inbox (applied_at)",
    "ix_ref_outbox_published_at": "ref_outbox (published_at)",
    "ix_ref_outbox_ledger_at": "ref_outbox (ledger_at)",
    # the rows not yet published (until 2026-12-06: the publisher reads from its position since)
    "ix_ref_outbox_unpublished": "ref_outbox (seq) WHERE published_at IS NULL",
}
KEPT = "ix_ref_inbox_kept"
PENDING = {"ix_ref_outbox_undelivered"}
#: The ledger forwarder's read, and the partial index it must read.
PENDING_READS = {
    "ix_ref_outbox_undelivered": "SELECT * FROM ref_outbox WHERE ledger_at IS NULL ORDER BY seq "
    "LIMIT 100",
}


async def _indexes(store: TradeStore, table: str) -> set[str]:
    async with store.db.read() as conn:
        found = await conn.run_sync(lambda c: inspect(c).get_indexes(table))
    return {str(i["name"]) for i in found}


async def test_a_store_indexes_only_what_its_queries_read(ref_url: str) -> None:
    store = await fresh_store(ref_url)
    try:
        assert await _indexes(store, "ref_outbox") == PENDING
        assert KEPT in await _indexes(store, "ref_inbox")
        assert not set(OLD_INDEXES) & (
            await _indexes(store, "ref_inbox") | await _indexes(store, "ref_outbox")
        )
    finally:
        await store.db.dispose()


async def _plan(store: TradeStore, sql: str) -> str:
    explain = "EXPLAIN QUERY PLAN" if store.db.is_sqlite else "EXPLAIN"
    async with store.db.read() as conn:
        rows = (await conn.execute(text(f"{explain} {sql}"))).all()
    return " ".join(str(r[-1]) for r in rows)


@pytest.mark.parametrize("before_ledger", [False, True], ids=["older", "before-ledger"])
async def test_an_older_store_loses_the_unused_indexes_and_gets_the_partial_ones(
    ref_url: str, before_ledger: bool
) -> None:
    """A store made before (the full indexes, no partial one; or before the ledger column, which
    came with its full index) is upgraded by ``create_schema``, idempotently; the kept events',
    the publisher's and the ledger forwarder's reads then use the partial indexes."""
    store = await fresh_store(ref_url)
    async with store.db.transaction() as conn:  # the indexes as a store made before had them
        for name in (KEPT, *PENDING):
            await conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
        for name, on in OLD_INDEXES.items():
            await conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {on}"))
        if before_ledger:
            await conn.execute(text("DROP INDEX ix_ref_outbox_ledger_at"))
            await conn.execute(text("ALTER TABLE ref_outbox DROP COLUMN ledger_at"))
    await store.db.dispose()
    upgraded = TradeStore(Database(ref_url), store.signer)
    try:
        await upgraded.create_schema()
        await upgraded.create_schema()  # twice: nothing left to do
        inbox_indexes = await _indexes(upgraded, "ref_inbox")
        outbox_indexes = await _indexes(upgraded, "ref_outbox")
        assert KEPT in inbox_indexes
        assert outbox_indexes >= PENDING
        assert not set(OLD_INDEXES) & (inbox_indexes | outbox_indexes)
        kept = "SELECT seq FROM ref_inbox WHERE trade_id = 't' AND applied_at IS NULL ORDER BY seq"
        assert KEPT in await _plan(upgraded, kept)
        for index, sql in PENDING_READS.items():
            plan = await _plan(upgraded, sql)
            assert index in plan, plan
            assert "Seq Scan" not in plan, plan
    finally:
        await upgraded.db.dispose()


def _params(store: TradeStore, trade_id: str, transition: machine.Transition | None) -> Any:
    """The transition function's parameters for a creation (``None``) or ``transition``."""
    if transition is None:
        event = store._event("order.created", trade_id, "create", machine.CREATED, _envelope(),
                             dict(ORDER), 1.0)  # fmt: skip
        fields = [ORDER[f] for f in ("account", "instrument", "side", "quantity", "amount",
                                     "currency")]  # fmt: skip
        head: tuple[Any, ...] = (trade_id, None, machine.CREATED, fields, "{}", None, None,
                                 "create", "alice")  # fmt: skip
    else:
        event = store._event(transition.event, trade_id, transition.name, transition.target,
                             _envelope(), {}, 1.0, transition.source)  # fmt: skip
        head = (trade_id, transition.source, transition.target, None, None, None,
                ['{"ssi": "Y"}'], transition.name, "clearing")  # fmt: skip
    return (*head, "k", event["event_id"], None, None, None, event["type"], "txn-1",
            event["jws"], 1000, APPEND_LOCKS["ref_outbox"], *(None,) * 8)  # fmt: skip


async def _outbox(store: TradeStore) -> int:
    async with store.db.transaction() as conn:
        return len((await conn.execute(select(outbox))).all())


@pytest.mark.postgres
async def test_a_creation_or_an_amendment_called_again_after_its_commit_is_one_transition(
    pg_database: str,
) -> None:
    """The function called twice with the same parameters (a retry after the first committed and
    its answer was lost): both answer moved, one transition, one event; for a creation (its
    insert would fail on the trade) and a move onto its own state (its compare-and-set would
    match again)."""
    store = await fresh_store(pg_database)
    try:
        await _called_twice(store)
    finally:
        await store.db.dispose()


async def _called_twice(store: TradeStore) -> None:
    create = _params(store, "T-1", None)
    assert await store_pg.apply(store.db, create) == (True, None)
    assert await store_pg.apply(store.db, create) == (True, None)
    for step in machine.PATH[:-1]:  # to settlement_submitted
        await store.apply("T-1", step, "b", _envelope(), None)
    amend = _params(store, "T-1", machine.amend_transition(1))
    assert await store_pg.apply(store.db, amend) == (True, None)
    assert await store_pg.apply(store.db, amend) == (True, None)
    names = [t.transition for t in await store.history("T-1")]
    assert names == ["create", "execute", "propose_allocation", "approve_allocation",
                     "submit_settlement", "amend#1"]  # fmt: skip
    assert await _outbox(store) == 6
    assert (await store.trade("T-1")).settlement == {"ssi": "Y"}


#: The transitions by acting token and by mandate (``resting_on``), as stores made before had them.
RESTING_INDEXES = {
    "ix_ref_transitions_token_jti": "token_jti",
    "ix_ref_transitions_mandate_id": "mandate_id",
}
RESTING = set(RESTING_INDEXES)
#: Each kind of store: a shared one (None) and each service's own.
EVERY_STORE = pytest.mark.parametrize(
    "service",
    [None, machine.SETTLEMENT, machine.EXECUTION, machine.ALLOCATION, machine.REPORTING],
    ids=["shared", machine.SETTLEMENT, machine.EXECUTION, machine.ALLOCATION, machine.REPORTING],
)


@EVERY_STORE
async def test_only_the_settlements_store_indexes_the_acting_tokens(
    ref_url: str, service: str | None
) -> None:
    """Every store records its transitions' acting token; only the settlement's looks trades up by
    it (an issuer's signal, ``resting_on``). The others, made before with both indexes (two entries
    per transition that nothing read), lose them; the settlement's (or a shared store) keeps them
    and its look reads them. Twice: idempotent."""
    store = await fresh_store(ref_url)
    async with store.db.transaction() as conn:  # as a store made before had them
        for name, column in RESTING_INDEXES.items():
            await conn.execute(
                text(f"CREATE INDEX IF NOT EXISTS {name} ON ref_transitions ({column})")
            )
    await store.db.dispose()
    upgraded = TradeStore(Database(ref_url), store.signer, service=service)
    try:
        for _ in range(2):
            await upgraded.create_schema()
            found = await _indexes(upgraded, "ref_transitions") & RESTING
            assert found == (RESTING if service in (None, machine.SETTLEMENT) else set())
        if found:
            for name, column in RESTING_INDEXES.items():
                where = f"token_iss = 'i' AND {column} = 'x'"
                sql = f"SELECT trade_id FROM ref_transitions WHERE {where}"  # noqa: S608
                assert name in await _plan(upgraded, sql)
    finally:
        await upgraded.db.dispose()
    await (await fresh_store(ref_url)).db.dispose()  # the shared test database as it was


async def _outbox_scans(url: str, seen: tuple[int, int] | None = None) -> tuple[int, int]:
    """``ref_outbox``'s (sequential, index) scans as PostgreSQL's statistics count them; with
    ``seen``: once they moved from it (a backend reports its counts after its statement, at most
    once a second, 10 s at the latest when idle)."""
    import asyncpg

    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        for _ in range(150):
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            row = await conn.fetchrow(
                "SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = 'ref_outbox'"
            )
            found = (int(row["seq_scan"]), int(row["idx_scan"] or 0))
            if seen is None or found != seen:
                return found
            await asyncio.sleep(0.1)
        raise AssertionError("the statistics of ref_outbox did not move")
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("with_read", [False, True], ids=["mark", "mark-then-read"])
async def test_the_publishers_mark_reads_no_whole_outbox_once_it_grew(
    pg_database: str, with_read: bool
) -> None:
    """The publisher's rounds on one held connection while the outbox is a page (as after a start):
    its statements are planned a few times, then their generic plan is kept; the outbox grows
    (rows published, as a running publisher leaves them behind). The next mark still finds its row
    by an index: a plan made on the small table was a sequential scan of the whole outbox, kept
    for every round after (no ``ANALYZE`` comes to replace it with autovacuum off or not yet
    run), so each round read every event ever written."""
    store = await fresh_store(pg_database)

    async def mark(seqs: list[int]) -> None:
        if with_read:
            assert await store.mark_then_unpublished(seqs, 10) == []
        else:
            await store.mark_published(seqs)

    try:
        async with store.db.transaction() as conn:  # a new outbox: no page yet
            await conn.execute(text("TRUNCATE ref_outbox"))
        for n in range(8):  # past the plan cache's five custom plans
            await store.create(f"T-{n}", ORDER, "alice", _envelope(), None)
            (event,) = await store.unpublished(10)
            await mark([event.seq])
        async with store.db.transaction() as conn:  # ~100 pages of published events
            await conn.execute(
                text(
                    "INSERT INTO ref_outbox (event_id, type, trade_id, jws, created_at, "
                    "published_at) SELECT 'e-' || g, 'order.created', 'X-' || g, "
                    "repeat('x', 1500), 1, 1 FROM generate_series(1, 400) AS g"
                )
            )
        await store.create("T-new", ORDER, "alice", _envelope(), None)
        (event,) = await store.unpublished(10)
        await asyncio.sleep(1.1)  # the connection reports what it did so far at its next statement
        assert await store.unpublished(10) == [event]
        before = await _outbox_scans(pg_database)
        await asyncio.sleep(1.1)
        await mark([event.seq])
        after = await _outbox_scans(pg_database, before)
        assert after[0] == before[0], (before, after)  # no sequential scan
        assert after[1] > before[1]  # an index scan
        assert await store.unpublished(10) == []
        assert (await store.events_after(event.seq - 1))[0].published
    finally:
        await store.db.dispose()


async def _key(store: TradeStore, table: str) -> list[str]:
    async with store.db.read() as conn:
        found = await conn.run_sync(lambda c: inspect(c).get_pk_constraint(table))
    return [str(c) for c in found["constrained_columns"]]


async def _index_names(store: TradeStore, table: str) -> set[str]:
    """Every index of ``table``, its primary key's and its constraints' included (PostgreSQL)."""
    async with store.db.read() as conn:
        rows = await conn.execute(
            text(
                "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = CAST(:t AS regclass)"
            ),
            {"t": table},
        )
        return {str(r[0]) for r in rows}


@pytest.mark.postgres
async def test_a_transition_and_an_event_write_only_the_index_entries_a_query_reads(
    pg_database: str,
) -> None:
    """On PostgreSQL a transition row is keyed by its step, ``(trade_id, transition)``: its unique
    constraint is the primary key, and ``id`` (the history's order, sorted within a trade) has no
    index of its own; an outbox row is indexed by ``seq`` (and the partial indexes of the rows
    not yet published or in the ledger), not by its event id. A store made before (a primary key
    on ``id`` beside the step's constraint, a unique event id) is moved by ``create_schema``,
    twice a no-op; its rows stay, a duplicate step is still refused."""
    store = await fresh_store(pg_database)
    try:
        assert await _key(store, "ref_transitions") == ["trade_id", "transition"]
        assert await _index_names(store, "ref_transitions") == {"uq_ref_transition_once"} | RESTING
        assert await _index_names(store, "ref_outbox") == {"ref_outbox_pkey"} | PENDING
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        async with store.db.transaction() as conn:  # as a store made before had them
            await conn.execute(
                text(
                    "ALTER TABLE ref_transitions DROP CONSTRAINT uq_ref_transition_once, "
                    "ADD CONSTRAINT ref_transitions_pkey PRIMARY KEY (id), "
                    "ADD CONSTRAINT uq_ref_transition_once UNIQUE (trade_id, transition)"
                )
            )
            await conn.execute(
                text(
                    "ALTER TABLE ref_outbox ADD CONSTRAINT ref_outbox_event_id_key "
                    "UNIQUE (event_id)"
                )
            )
        assert await _key(store, "ref_transitions") == ["id"]
        await store.db.dispose()
        upgraded = TradeStore(Database(pg_database), store.signer)
        for _ in range(2):
            await upgraded.create_schema()
            assert await _key(upgraded, "ref_transitions") == ["trade_id", "transition"]
            assert (
                await _index_names(upgraded, "ref_transitions")
                == {"uq_ref_transition_once"} | RESTING
            )
            assert await _index_names(upgraded, "ref_outbox") == {"ref_outbox_pkey"} | PENDING
        await upgraded.apply("T-1", machine.EXECUTE, "b", _envelope(), None)
        with pytest.raises(DuplicateTransition):
            await upgraded.apply("T-1", machine.EXECUTE, "b", _envelope(), None)
        history = [(t.transition, t.source) for t in await upgraded.history("T-1")]
        assert history == [("create", None), ("execute", machine.CREATED)]
        assert [e.type for e in await upgraded.events_after(0)] == ["order.created",
                                                                     "trade.executed"]  # fmt: skip
        store = upgraded
    finally:
        await store.db.dispose()


@pytest.mark.postgres
@EVERY_STORE
async def test_only_the_reporting_store_keys_its_inbox_by_seq(
    pg_database: str, service: str | None
) -> None:
    """The inbox's primary key on ``seq`` is read by the reporting feed only (``seq > n ORDER BY
    seq``): the reporting store (and a shared one) keeps it; the owners'
    stores, made before with it (an entry per learned event that nothing read), lose it and
    learn by the event id's unique index. Twice: idempotent; and back where a feed needs it."""
    store = await fresh_store(pg_database)  # a shared store: keyed by seq, as every store was
    assert await _key(store, "ref_inbox") == ["seq"]
    await store.db.dispose()
    signer = None if service == machine.REPORTING else store.signer
    upgraded = TradeStore(Database(pg_database), signer, service=service)
    feed = service in (None, machine.REPORTING)
    try:
        for _ in range(2):
            await upgraded.create_schema()
            assert await _key(upgraded, "ref_inbox") == (["seq"] if feed else [])
            assert await _index_names(upgraded, "ref_inbox") == (
                {"ref_inbox_event_id_key", KEPT} | ({INBOX_KEY} if feed else set())
            )
    finally:
        await upgraded.db.dispose()
    again = await fresh_store(pg_database)  # the shared test database as it was
    try:
        assert await _key(again, "ref_inbox") == ["seq"]
    finally:
        await again.db.dispose()


async def _outbox_updates(url: str, at_least: int) -> tuple[int, int]:
    """``ref_outbox``'s (updates, HOT updates) as PostgreSQL's statistics count them, once the
    updates reached ``at_least`` (a backend reports its counts after its statement, at most once
    a second, 10 s at the latest when idle)."""
    import asyncpg

    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        for _ in range(150):
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            row = await conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE relname = 'ref_outbox'"
            )
            found = (int(row["n_tup_upd"]), int(row["n_tup_hot_upd"]))
            if found[0] >= at_least:
                return found
            await asyncio.sleep(0.1)
        raise AssertionError(f"ref_outbox's updates did not reach {at_least}")
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("with_read", [False, True], ids=["mark", "mark-then-read"])
async def test_the_publishers_mark_is_an_in_place_update(pg_database: str, with_read: bool) -> None:
    """No index of the outbox holds ``published_at`` or has it in its predicate, and the outbox's
    pages keep room for a new version of a row: the publisher's mark is a HOT update (no index
    entry written), every one of them, for events written one by one (each marked after its own
    commit) and in a batch. Before: the partial index of the unpublished rows made each mark an
    update that wrote an entry in every index. A store made before gets the fillfactor."""
    store = await fresh_store(pg_database)
    try:
        async with store.db.transaction() as conn:  # a store made before: full pages
            await conn.execute(text("ALTER TABLE ref_outbox RESET (fillfactor)"))
            await conn.execute(text("TRUNCATE ref_outbox"))
        await store.db.dispose()
        store = TradeStore(Database(pg_database), store.signer)
        await store.create_schema()
        before = await _outbox_updates(pg_database, 0)
        for n in range(12):
            await store.create(f"T-{n}", ORDER, "alice", _envelope(), None)
            (event,) = await store.unpublished(10)
            if with_read:
                assert await store.mark_then_unpublished([event.seq], 10) == []
            else:
                await store.mark_published([event.seq])
        for n in range(12, 24):
            await store.create(f"T-{n}", ORDER, "alice", _envelope(), None)
        batch = await store.unpublished(100)
        assert len(batch) == 12
        await store.mark_published([e.seq for e in batch])
        updates, hot = await _outbox_updates(pg_database, before[0] + 24)
        assert (updates - before[0], hot - before[1]) == (24, 24)
        assert await store.unpublished(100) == []
        assert all(e.published for e in await store.events_after(0, 100))
    finally:
        await store.db.dispose()


async def test_the_publishers_position_skips_no_unpublished_row(ref_url: str) -> None:
    """The publisher reads from its position (every row up to it published) by the primary key:
    a row marked out of order (another publisher, a partial ack) does not move the position past
    an unpublished one before it; a store object made anew (a restart) finds the oldest
    unpublished row; a read that finds none moves past what was marked before it."""
    store = await fresh_store(ref_url)
    try:
        for n in range(4):
            await store.create(f"T-{n}", ORDER, "alice", _envelope(), None)
        first = await store.unpublished(10)
        seqs = [e.seq for e in first]
        assert len(seqs) == 4
        await store.mark_published([seqs[1]])
        assert [e.seq for e in await store.unpublished(10)] == [seqs[0], *seqs[2:]]
        again = TradeStore(store.db, store.signer)  # a restart: position 0
        assert [e.seq for e in await again.mark_then_unpublished([seqs[0]], 10)] == seqs[2:]
        assert await store.mark_then_unpublished(seqs[2:], 1) == []
        assert store._published_through == seqs[3]
        await store.create("T-4", ORDER, "alice", _envelope(), None)
        (last,) = await store.unpublished(10)
        assert (last.trade_id, store._published_through) == ("T-4", seqs[3])
        assert [e.trade_id for e in await again.unpublished(10)] == ["T-4"]
        assert all(e.published for e in await store.events_after(0, 100) if e.trade_id != "T-4")
    finally:
        await store.db.dispose()


async def _columns(store: TradeStore, table: str) -> list[str]:
    async with store.db.read() as conn:
        rows = await conn.execute(
            text(
                "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            ),
            {"t": table},
        )
        return [str(r[0]) for r in rows]


#: ``ref_trades`` as a store made before 2026-12-06 had it: the envelope between the columns a
#: step changes (``state`` before it, ``proposer`` to ``updated_at`` after it).
OLD_TRADES = (
    "CREATE TABLE ref_trades (trade_id VARCHAR(64) NOT NULL, state VARCHAR(32) NOT NULL, "
    "account VARCHAR(64) NOT NULL, instrument VARCHAR(64) NOT NULL, side VARCHAR(8) NOT NULL, "
    "quantity VARCHAR(40) NOT NULL, amount VARCHAR(40) NOT NULL, currency VARCHAR(3) NOT NULL, "
    "txn VARCHAR(256), envelope TEXT NOT NULL, proposer VARCHAR(256), allocation TEXT, "
    "settlement TEXT, exceptions INTEGER NOT NULL, version INTEGER NOT NULL, "
    "created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, "
    "CONSTRAINT ref_trades_pkey PRIMARY KEY (trade_id))"
)
#: The columns no step changes, the envelope last of them: PostgreSQL's WAL record of a HOT
#: update leaves out the prefix the two versions share.
UNCHANGED = ["trade_id", "account", "instrument", "side", "quantity", "amount", "currency", "txn",
             "created_at", "envelope"]  # fmt: skip
CHANGED = ["state", "proposer", "allocation", "settlement", "exceptions", "version", "updated_at"]


@pytest.mark.postgres
async def test_a_trades_envelope_comes_before_the_columns_its_steps_change(
    pg_database: str,
) -> None:
    """A step's update rewrites ``state``, ``version``, ``updated_at`` (and the allocation, the
    settlement, the exception count), never the order's fields or its envelope: those come first,
    so that the WAL record of each (HOT) update leaves them out as the prefix both versions
    share. A store made before (the envelope between ``state`` and ``updated_at``) is made anew
    in this order by ``create_schema``, its trades kept; twice a no-op."""
    store = await fresh_store(pg_database)
    try:
        assert await _columns(store, "ref_trades") == [*UNCHANGED, *CHANGED]
        async with store.db.transaction() as conn:  # a store made before, with a trade
            await conn.execute(text("DROP TABLE ref_trades"))
            await conn.execute(text(OLD_TRADES))
        await store.create("T-1", ORDER, "alice", _envelope(), None)
        trade = await store.trade("T-1")
        await store.db.dispose()
        store = TradeStore(Database(pg_database), store.signer)
        for _ in range(2):
            await store.create_schema()
            assert await _columns(store, "ref_trades") == [*UNCHANGED, *CHANGED]
            assert await _index_names(store, "ref_trades") == {"ref_trades_pkey"}
        assert await store.trade("T-1") == trade
        await store.apply("T-1", machine.EXECUTE, "b", _envelope(), None)
        moved = await store.trade("T-1")
        assert (moved.state, moved.version, moved.envelope) == (
            machine.EXECUTE.target, 2, trade.envelope,
        )  # fmt: skip
    finally:
        await store.db.dispose()
