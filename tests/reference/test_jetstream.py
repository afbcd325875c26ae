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
from tests.reference.conftest import ORDER
from trustplane.reference.events import Envelope, EventSigner
from trustplane.reference.jetstream import (
    DOMAINS,
    OutboxPublisher,
    VerifyingConsumer,
    stream_name,
)
from trustplane.reference.store import TradeStore, outbox
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

    # a crash between the ack and the mark: the rows are published again, JetStream drops them
    async with store.db.transaction() as conn:
        await conn.execute(update(outbox).values(published_at=None))
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
