"""The outbox into NATS JetStream (CI=true: the real server on 127.0.0.1:4222): verified delivery
to a durable explicit-ack consumer, a tampered event refused, duplicates removed by Nats-Msg-Id,
NATS down (the outbox grows, then drains), and a publisher killed with SIGKILL mid-drain (nothing
lost, nothing twice in the stream)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from sqlalchemy import func, select, update

from tests.conftest import free_port, require_service
from tests.reference.conftest import (
    ORDER,
    Mandates,
    RecordingPdp,
    caller,
    fresh_store,
    split_stores,
    upstreams,
)
from trustplane.reference import machine
from trustplane.reference.events import Envelope, EventSigner
from trustplane.reference.handoff import learn_verified
from trustplane.reference.jetstream import (
    DOMAINS,
    OutboxPublisher,
    VerifyingConsumer,
    learning_consumers,
    stream_name,
)
from trustplane.reference.services import TradeServices
from trustplane.reference.store import KNOWN, PENDING, TradeStore, outbox
from trustplane.storage.db import Database

NATS = "nats://127.0.0.1:4222"
ISSUER = "https://settle.example"


@pytest.fixture
def prefix() -> str:
    require_service("NATS", "127.0.0.1", 4222)
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
async def js(prefix: str) -> AsyncIterator[Any]:
    nc = await nats.connect(NATS)
    yield nc.jetstream()
    for domain in DOMAINS:
        with contextlib.suppress(Exception):  # a stream the test never created
            await nc.jetstream().delete_stream(stream_name(prefix, domain))
    await nc.close()


async def new_store(path: Path, key: Path | None = None) -> TradeStore:
    signer = EventSigner.from_file(ISSUER, key) if key else EventSigner.generate(ISSUER)
    store = TradeStore(Database(f"sqlite+aiosqlite:///{path}"), signer)
    await store.create_schema()
    return store


async def orders(store: TradeStore, n: int) -> None:
    envelope = Envelope("txn-1", "alice", "desk", mandate={"id": "M-1", "version": 1})
    for _ in range(n):
        await store.create(str(uuid.uuid4()), ORDER, "alice", envelope, None)


async def in_streams(js: Any, prefix: str) -> int:
    total = 0
    for domain in DOMAINS:
        try:
            total += (await js.stream_info(stream_name(prefix, domain))).state.messages
        except Exception:  # noqa: S112 - not created yet
            continue
    return total


async def unpublished(store: TradeStore) -> int:
    async with store.db.read() as conn:
        query = select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
        return int((await conn.execute(query)).scalar_one())


async def test_published_events_reach_a_verifying_durable_consumer(
    tmp_path: Path, prefix: str, js: Any
) -> None:
    store = await new_store(tmp_path / "a.db")
    await orders(store, 5)
    publisher = OutboxPublisher(store, NATS, prefix=prefix)
    assert await publisher.drain_once() == 5
    assert await publisher.drain_once() == 0
    assert await unpublished(store) == 0

    # a crash between the ack and the mark: the rows are published again by the publisher that
    # starts next (its position re-read: the oldest unpublished row), JetStream drops them
    async with store.db.transaction() as conn:
        await conn.execute(update(outbox).values(published_at=None))
    store = TradeStore(store.db, store.signer)
    publisher = OutboxPublisher(store, NATS, prefix=prefix)
    assert await publisher.drain_once() == 5
    assert await in_streams(js, prefix) == 5

    # a forged event on the same subject: refused by the consumer, never handed on
    real = (await store.events_after(0))[0].jws
    head, payload, sig = real.split(".")
    await js.publish(f"{prefix}.order.created", f"{head}.{payload}x.{sig}".encode())
    handled: list[dict[str, Any]] = []

    async def handle(event: dict[str, Any]) -> None:
        handled.append(event)

    consumer = VerifyingConsumer(
        js, domain="order", durable="settlement", jwks=store.signer.jwks(), issuer=ISSUER,
        prefix=prefix,
    )  # fmt: skip
    assert await consumer.consume(handle, wait=2.0) == 5
    assert len(consumer.refused) == 1
    assert {e["type"] for e in handled} == {"order.created"}
    assert await consumer.consume(handle, wait=0.5) == 0  # all acked (or terminated)
    await publisher.close()
    await store.db.dispose()


async def test_nats_down_the_outbox_grows_then_drains(tmp_path: Path, prefix: str, js: Any) -> None:
    store = await new_store(tmp_path / "b.db")
    await orders(store, 3)
    down = OutboxPublisher(store, f"nats://127.0.0.1:{free_port()}", prefix=prefix)
    stopping = asyncio.Event()
    task = asyncio.create_task(down.run(stopping, idle=0.05, max_backoff=0.2))
    await asyncio.sleep(0.5)
    await orders(store, 2)
    assert await unpublished(store) == 5  # nothing lost, nothing published
    stopping.set()
    await task

    up = OutboxPublisher(store, NATS, prefix=prefix)
    stopping = asyncio.Event()
    task = asyncio.create_task(up.run(stopping, idle=0.05))
    for _ in range(100):
        if await unpublished(store) == 0:
            break
        await asyncio.sleep(0.05)
    stopping.set()
    await task
    await up.close()
    assert await unpublished(store) == 0
    assert await in_streams(js, prefix) == 5
    await store.db.dispose()


async def test_a_publisher_killed_mid_drain_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, prefix: str, js: Any
) -> None:
    db, key, total = tmp_path / "c.db", tmp_path / "event-key.pem", 300
    store = await new_store(db, key)
    await orders(store, total)
    command = [
        sys.executable, "-m", "trustplane.reference.jetstream", "--database",
        f"sqlite+aiosqlite:///{db}", "--nats", NATS, "--key", str(key), "--issuer", ISSUER,
        "--prefix", prefix, "--batch", "7",
    ]  # fmt: skip
    first = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if await unpublished(store) < total - 30:
                break
            await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
    finally:
        await asyncio.wait_for(first.wait(), 10)
    left = await unpublished(store)
    assert 0 < left < total, "the publisher should die mid-drain"
    in_stream_at_kill = await in_streams(js, prefix)
    assert in_stream_at_kill >= total - left  # every marked row was acked before

    second = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL)
    try:
        for _ in range(1000):
            if await unpublished(store) == 0:
                break
            await asyncio.sleep(0.02)
    finally:
        second.send_signal(signal.SIGKILL)
        await asyncio.wait_for(second.wait(), 10)
    assert await unpublished(store) == 0
    assert await in_streams(js, prefix) == total  # nothing lost, the re-published ones dropped
    await store.db.dispose()


async def test_a_failing_handler_gets_the_event_again(tmp_path: Path, prefix: str, js: Any) -> None:
    store = await new_store(tmp_path / "d.db")
    await orders(store, 1)
    publisher = OutboxPublisher(store, NATS, prefix=prefix)
    assert await publisher.drain_once() == 1
    consumer = VerifyingConsumer(
        js, domain="order", durable="flaky", jwks=store.signer.jwks(), issuer=ISSUER,
        prefix=prefix,
    )  # fmt: skip
    seen: list[str] = []

    async def flaky(event: dict[str, Any]) -> None:
        seen.append(event["jti"])
        if len(seen) == 1:
            raise RuntimeError("downstream busy")

    with pytest.raises(RuntimeError, match="busy"):
        await consumer.consume(flaky, wait=2.0)
    assert await consumer.consume(flaky, wait=2.0) == 1  # redelivered after the nak, then acked
    assert seen[0] == seen[1]
    assert await consumer.consume(flaky, wait=0.5) == 0
    await publisher.close()
    await store.db.dispose()


async def test_the_hand_off_over_jetstream_learns_each_event_once_in_order(
    tmp_path: Path, prefix: str, js: Any
) -> None:
    """Each owner's outbox published by its own publisher; the settlement's learning consumers:
    the allocation's event ahead of the execution's is nak'ed (pending) and applied on its
    redelivery once the trade was learned; a forged event is terminated, never applied."""
    urls = {s: f"sqlite+aiosqlite:///{tmp_path / f'{s}.db'}" for s in machine.SERVICES}
    stores = await split_stores(urls)
    try:
        pdp = RecordingPdp()
        plain = TradeServices(stores, Mandates())  # no embedded hand-off: JetStream only
        trade = await plain.create_order(caller("alice", pdp), ORDER, "k")
        await plain.execute(caller("b", pdp), trade.trade_id, "k")
        ups = {u.service: u for u in upstreams(stores)}
        for event in await stores.execution.events_after(0):  # allocation learns by hand here
            await learn_verified(stores.allocation, event.jws, ups[machine.EXECUTION])
        await plain.propose_allocation(
            caller("a", pdp), trade.trade_id, [{"account": "S", "quantity": "1000"}], "k"
        )
        for owner in (machine.EXECUTION, machine.ALLOCATION):
            publisher = OutboxPublisher(stores.by_service()[owner], NATS, prefix=prefix)
            try:
                assert await publisher.drain_once()
            finally:
                await publisher.close()
        real = (await stores.execution.events_after(0))[0].jws
        head, payload, sig = real.split(".")
        await js.publish(f"{prefix}.order.created", f"{head}.{payload}x.{sig}".encode())

        settlement = stores.settlement
        consumers = {
            c.domain: c
            for c in learning_consumers(
                js, {"settlement": settlement}, list(ups.values()), prefix=prefix
            )
        }
        assert sorted(consumers) == ["allocation", "order", "trade"]  # never its own domains
        assert await consumers["allocation"].consume(wait=2) == 0
        assert consumers["allocation"].outcomes == [PENDING]
        assert await settlement.pending() != []
        assert await consumers["trade"].consume(wait=2) == 0  # trade.executed: pending too
        assert (
            await consumers["order"].consume(wait=2) == 1
        )  # the order (and the kept ones with it)
        assert len(consumers["order"].refused) == 1  # the forged one, terminated
        history = await settlement.history(trade.trade_id)
        assert [r.transition for r in history] == ["create", "execute", "propose_allocation"]
        assert await settlement.pending() == []

        async def redelivered() -> None:  # the nak'ed ones come back: known, acked
            while not (
                KNOWN in consumers["allocation"].outcomes[1:]
                and KNOWN in consumers["trade"].outcomes[1:]
            ):
                await consumers["allocation"].consume(wait=0.5)
                await consumers["trade"].consume(wait=0.5)

        await asyncio.wait_for(redelivered(), 15)
        assert len(await settlement.history(trade.trade_id)) == 3
    finally:
        for store in stores.distinct():
            await store.db.dispose()


async def test_a_woken_publisher_reads_once_per_commit_not_on_a_timer(
    ref_url: str, prefix: str, js: Any
) -> None:
    """On PostgreSQL the outbox's trigger notifies the publisher at each commit; on SQLite the
    serving process's commits wake it (``TradeServices.on_commit``). Quiet, it does not read the
    outbox again before its fallback (an hour here); a commit gets it published."""
    store = await fresh_store(ref_url)
    pdp, wake = RecordingPdp(), asyncio.Event()
    services = TradeServices(store, Mandates())
    if store.db.is_sqlite:
        services.on_commit.append(lambda _owner: wake.set())
    publisher = OutboxPublisher(store, NATS, prefix=prefix)
    reads = 0
    unpublished_rows = store.unpublished

    async def counted(limit: int = 100) -> list[Any]:
        nonlocal reads
        reads += 1
        return await unpublished_rows(limit)

    store.unpublished = counted  # type: ignore[method-assign]
    stopping = asyncio.Event()
    task = asyncio.create_task(
        publisher.run(stopping, idle=3600, wake=wake if store.db.is_sqlite else None)
    )
    try:
        for _ in range(200):  # the first read, at start (PostgreSQL: once listening)
            if reads and (store.db.is_sqlite or await _listening(store)):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        quiet = reads
        assert quiet <= 2  # the start, and (PostgreSQL) the catch-up when the listener connected
        await services.create_order(caller("alice", pdp), dict(ORDER), "k-1")
        for _ in range(200):
            if await unpublished(store) == 0:
                break
            await asyncio.sleep(0.05)
        assert await unpublished(store) == 0
        assert await in_streams(js, prefix) == 1
        assert reads <= quiet + 2
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
        await publisher.close()
        await store.db.dispose()


async def _listening(store: TradeStore) -> bool:
    """Whether a session of the store's database listens (other processes on the server may).
    Once it does, the listener wakes the publisher for a catch-up read: callers let that read end
    before they commit, or it may find their commit and the commit's own wake-up read again."""
    async with store.db.read() as conn:
        found = await conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        )
        listening = bool(found.scalar())
    if listening:
        await asyncio.sleep(0.2)  # the catch-up read
    return listening


@pytest.mark.postgres
async def test_a_woken_publisher_marks_a_round_with_the_next_read(
    pg_database: str, prefix: str, js: Any
) -> None:
    """On PostgreSQL a woken publisher's round is one statement: the last round's mark goes with
    the next read (``TradeStore.mark_then_unpublished``); a quiet outbox gets its mark alone after
    ``linger`` seconds, and a stopping publisher marks what it carries."""
    store = await fresh_store(pg_database)
    publisher = OutboxPublisher(store, NATS, prefix=prefix)
    publisher.linger = 3600.0  # nothing marked alone while the test commits
    alone: list[list[int]] = []
    mark_alone = store.mark_published

    async def counted(seqs: Any) -> None:
        alone.append(list(seqs))
        await mark_alone(seqs)

    store.mark_published = counted  # type: ignore[method-assign]
    stopping = asyncio.Event()
    task = asyncio.create_task(publisher.run(stopping, idle=3600))

    async def published(n: int) -> None:
        for _ in range(200):
            if await in_streams(js, prefix) == n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{n} events not published")

    try:
        for _ in range(200):
            if await _listening(store):
                break
            await asyncio.sleep(0.05)
        await orders(store, 1)
        await published(1)
        assert await unpublished(store) == 1  # acked, its mark carried
        await orders(store, 1)
        await published(2)
        assert await unpublished(store) == 1  # the first marked by the read of the second
        assert alone == []
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
    assert await unpublished(store) == 0  # the stopping publisher marked the second
    assert len(alone) == 1

    publisher.linger = 0.05  # quiet: marked alone after linger seconds
    stopping = asyncio.Event()
    task = asyncio.create_task(publisher.run(stopping, idle=3600))
    try:
        await orders(store, 1)
        await published(3)
        for _ in range(100):
            if await unpublished(store) == 0:
                break
            await asyncio.sleep(0.05)
        assert await unpublished(store) == 0  # alone, or with a read (the listener's catch-up)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
        await publisher.close()
        await store.db.dispose()
