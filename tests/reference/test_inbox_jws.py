"""What a store's inbox keeps of a learned event on PostgreSQL: the reporting store (the feed) and a
store shared by all services keep every signed event; an owner's store keeps it only while the
event waits for its predecessor (its retry reads it), and records an event applied on arrival
without it (docs/settlement.md, "Stores"). SQLite keeps it everywhere."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.reference.conftest import fresh_store, split_stores
from tests.reference.test_store_reads import _created_and_executed
from trustplane.reference import machine
from trustplane.reference.store import APPLIED, KNOWN, PENDING, TradeStore
from trustplane.storage.db import Database


async def _inbox_jws(store: TradeStore) -> dict[str, str | None]:
    """Each inbox row's transition and its ``jws`` (None when the row keeps none)."""
    async with store.db.read() as conn:
        rows = (await conn.execute(text("SELECT transition, jws FROM ref_inbox"))).all()
    return {str(r[0]): r[1] for r in rows}


@pytest.mark.postgres
async def test_an_owners_store_keeps_a_learned_event_only_while_it_waits(
    pg_service_databases: dict[str, str],
) -> None:
    """Settlement learns ``execute`` before ``create``: kept with its JWS (pending), then applied
    from it once ``create`` arrives, which is recorded without its JWS; the reporting store keeps
    both; a redelivery of either is known, whatever the row keeps."""
    stores = await split_stores(pg_service_databases)
    owner, settlement, reporting = stores.execution, stores.settlement, stores.reporting
    try:
        events, learning = await _created_and_executed(owner)
        (created, created_jws), (executed, executed_jws) = learning
        assert await settlement.learn(executed, executed_jws) == PENDING
        assert await _inbox_jws(settlement) == {"execute": executed_jws}
        assert await settlement.learn(created, created_jws) == APPLIED
        assert (await settlement.trade("T-1")).state == machine.EXECUTED  # from the kept JWS
        assert await _inbox_jws(settlement) == {"create": None, "execute": executed_jws}
        assert await settlement.learn(created, created_jws) == KNOWN
        assert await settlement.learn(executed, executed_jws) == KNOWN
        last = events[-1].seq
        assert await reporting.learn_all(learning, "execution", last) == ([APPLIED] * 2, last)
        assert await _inbox_jws(reporting) == {"create": created_jws, "execute": executed_jws}
        assert [e.jws for e in await reporting.feed_after(0)] == [created_jws, executed_jws]
    finally:
        for store in stores.distinct():
            await store.db.dispose()


@pytest.mark.postgres
async def test_several_events_learned_at_once_keep_no_jws_in_an_owners_store(
    pg_service_databases: dict[str, str],
) -> None:
    """The statement for several events (``ref_learn_all``) keeps none either."""
    stores = await split_stores(pg_service_databases)
    owner, allocation = stores.execution, stores.allocation
    try:
        events, learning = await _created_and_executed(owner)
        last = events[-1].seq
        assert await allocation.learn_all(learning, "execution", last) == ([APPLIED] * 2, last)
        assert await _inbox_jws(allocation) == {"create": None, "execute": None}
        assert [e.event_id for e in await allocation.feed_after(0)] == [e.event_id for e in events]
    finally:
        for store in stores.distinct():
            await store.db.dispose()


@pytest.mark.postgres
async def test_a_store_made_before_lets_its_inbox_keep_no_jws(pg_database: str) -> None:
    """An inbox whose ``jws`` is ``NOT NULL`` (a store made before) is freed by
    ``create_schema``, idempotently."""
    store = await fresh_store(pg_database)
    try:
        async with store.db.transaction() as conn:
            await conn.execute(text("ALTER TABLE ref_inbox ALTER COLUMN jws SET NOT NULL"))
    finally:
        await store.db.dispose()
    upgraded = TradeStore(Database(pg_database), store.signer, service=machine.SETTLEMENT)
    try:
        for _ in range(2):
            await upgraded.create_schema()
            async with upgraded.db.read() as conn:
                required = (
                    await conn.execute(
                        text(
                            "SELECT attnotnull FROM pg_attribute WHERE attname = 'jws' "
                            "AND attrelid = 'ref_inbox'::regclass"
                        )
                    )
                ).scalar()
            assert required is False
    finally:
        await upgraded.db.dispose()
    again = await fresh_store(pg_database)  # the shared test database's store as it was
    await again.db.dispose()
