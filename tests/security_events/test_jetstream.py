"""The authorization server's security events into NATS JetStream (CI=true: the real server on
127.0.0.1:4222): every event reaches a durable explicit-ack consumer that verifies it (ours and an
independent one on PyJWT), a forgery or another kind of JWT is refused, a re-publish is dropped by
``Nats-Msg-Id``, NATS down lets the events wait in the ledger until it is back, and a publisher
killed with SIGKILL mid-drain loses nothing and duplicates nothing (PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import nats
import pytest
from sqlalchemy import select, update

from tests.conftest import KEK, free_port, require_service
from tests.protocol_server import DATABASES, Server, running_server
from tests.security_events.helpers import (
    alert,
    append_raw,
    security_event_ids,
    verify_with_pyjwt,
)
from trustplane.audit.tables import audit_leaves
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.events.jetstream import JetStreamPublisher, VerifyingConsumer
from trustplane.security_events.publisher import (
    LedgerOutbox,
    stream,
    subject_of,
    verifying_consumer,
)
from trustplane.security_events.stream import SECURITY_TYPES, SecurityEvents, tree_size
from trustplane.security_events.tables import security_event_cursors

NATS = "nats://127.0.0.1:4222"
TRUSTPLANE = str(Path(sys.executable).with_name("trustplane"))
#: A round long enough to be killed inside: the publisher sends a round's events without waiting
#: (IN_FLIGHT at a time) and awaits their acks together, so a round of 50 went by between two looks.
BATCH = 500


@pytest.fixture
def prefix() -> str:
    require_service("NATS", "127.0.0.1", 4222)
    return f"ase{secrets.token_hex(4)}"


@pytest.fixture
async def js(prefix: str) -> AsyncIterator[Any]:
    nc = await nats.connect(NATS)
    yield nc.jetstream()
    with contextlib.suppress(Exception):  # a stream the test never created
        await nc.jetstream().delete_stream(stream(prefix).name)
    await nc.close()


@pytest.fixture(params=DATABASES)
async def as_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(request, tmp_path_factory) as server:
        yield server


def publisher_for(server: Server, prefix: str, url: str = NATS, batch: int = 100) -> Any:
    services = server.services
    events = SecurityEvents(
        services.db, services.keys, issuer=server.issuer, origin=services.settings.audit_origin
    )
    outbox = LedgerOutbox(services.db, events, prefix=prefix)
    return outbox, JetStreamPublisher(outbox, url, [stream(prefix)], batch=batch)


async def in_stream(js: Any, prefix: str) -> int:
    try:
        return int((await js.stream_info(stream(prefix).name)).state.messages)
    except Exception:  # not created yet
        return 0


async def size_of(server: Server) -> int:
    async with server.services.db.read() as conn:
        return await tree_size(conn)


async def drained(outbox: LedgerOutbox, publisher: Any, server: Server) -> None:
    """Publish until the publisher's position is the end of the ledger."""
    for _ in range(1000):
        await publisher.drain_once()
        if await outbox.position() == await size_of(server):
            return
    raise AssertionError("the publisher did not reach the end of the ledger")


async def revocations(server: Server, n: int) -> None:
    """``n`` security events straight into the ledger (as the revocation endpoint writes them)."""
    base = AuditEvent(type=AuditEventType.TOKEN_REVOKED, issuer=server.issuer).to_dict()
    bodies = [{**base, "event_id": secrets.token_hex(16), "jti": f"t{i}"} for i in range(n)]
    await append_raw(server.services.db, *bodies)
    await server.services.ledger.integrate_all()


async def consume_all(consumer: VerifyingConsumer, expect: int) -> list[dict[str, Any]]:
    """Every event the consumer hands over, until ``expect`` of them were handled (then one more
    fetch, which must bring nothing: a duplicate would show) or ten fetches in a row bring nothing
    (a loaded machine can let one pull's one-second wait pass before the server answers it)."""
    handled: list[dict[str, Any]] = []

    async def handle(event: dict[str, Any]) -> None:
        handled.append(event)

    empty = 0
    while empty < (1 if len(handled) >= expect else 10):
        refused = len(consumer.refused)
        if await consumer.consume(handle, batch=500, wait=1.0) or len(consumer.refused) > refused:
            empty = 0
        else:
            empty += 1
    return handled


def pyjwt_consumer(js: Any, prefix: str, jwks: dict[str, Any], issuer: str) -> VerifyingConsumer:
    """The independent check: nothing of trustplane's JOSE, only PyJWT and the published JWKS."""
    return VerifyingConsumer(
        js,
        stream(prefix).name,
        f"{prefix}.security.>",
        "independent",
        lambda data: verify_with_pyjwt(data, jwks, issuer),
        refusals=(jwt.InvalidTokenError, jwt.PyJWKError, ValueError),
    )


async def test_events_reach_verifying_consumers_and_forgeries_are_refused(
    as_server: Server, prefix: str, js: Any
) -> None:
    server = as_server
    await revocations(server, 5)
    await append_raw(server.services.db, alert(server.issuer, subject="trader-7"))
    await server.services.ledger.integrate_all()
    ids = await security_event_ids(server.services.db)
    outbox, publisher = publisher_for(server, prefix, batch=4)
    await drained(outbox, publisher, server)
    assert await in_stream(js, prefix) == len(ids)

    # a crash after the acks and before the position moved: all published again, all dropped
    async with server.services.db.transaction() as conn:
        await conn.execute(update(security_event_cursors).values(position=0))
    await drained(outbox, publisher, server)
    assert await in_stream(js, prefix) == len(ids)

    # on the stream: a forged event (payload changed) and an access token of ours (another typ)
    real = await js.get_last_msg(
        stream(prefix).name, subject_of(prefix, "surveillance:alert:raised")
    )
    head, payload, signature = real.data.decode().split(".")
    flipped = "A" if payload[10] != "A" else "B"
    forged = f"{head}.{payload[:10]}{flipped}{payload[11:]}.{signature}"
    await js.publish(subject_of(prefix, "surveillance:alert:raised"), forged.encode())
    access_token = await server.access_token()
    await js.publish(subject_of(prefix, "oauth:token:revoked"), access_token.encode())

    jwks = (await server.http.get("/jwks")).json()
    ours = verifying_consumer(js, prefix=prefix, durable="siem", jwks=jwks, issuer=server.issuer)
    handled = await consume_all(ours, len(ids))
    assert [e["jti"] for e in handled] == ids  # in ledger order, each once
    assert len(ours.refused) == 2
    assert any("typ" in reason for reason in ours.refused)
    independent = pyjwt_consumer(js, prefix, jwks, server.issuer)
    assert [e["jti"] for e in await consume_all(independent, len(ids))] == ids
    assert len(independent.refused) == 2
    assert {e["type"] for e in handled} >= {"oauth:token:revoked", "surveillance:alert:raised"}
    await publisher.close()


async def test_nats_down_the_events_wait_in_the_ledger_then_drain(
    as_server: Server, prefix: str, js: Any
) -> None:
    server = as_server
    await revocations(server, 3)
    outbox, down = publisher_for(server, prefix, url=f"nats://127.0.0.1:{free_port()}")
    stopping = asyncio.Event()
    task = asyncio.create_task(down.run(stopping, idle=0.05, max_backoff=0.2))
    await asyncio.sleep(0.5)
    await revocations(server, 2)
    stopping.set()
    await task
    await down.close()
    ids = await security_event_ids(server.services.db)
    assert await outbox.position() < await size_of(server)  # nothing counted as published
    assert await in_stream(js, prefix) == 0

    outbox, up = publisher_for(server, prefix)
    stopping = asyncio.Event()
    task = asyncio.create_task(up.run(stopping, idle=0.05))
    for _ in range(200):
        if await outbox.position() == await size_of(server):
            break
        await asyncio.sleep(0.05)
    stopping.set()
    await task
    await up.close()
    assert await in_stream(js, prefix) == len(ids)


async def security_event_indices(server: Server) -> list[int]:
    async with server.services.db.read() as conn:
        query = (
            select(audit_leaves.c.idx)
            .where(audit_leaves.c.type.in_(sorted(SECURITY_TYPES)))
            .order_by(audit_leaves.c.idx)
        )
        return [int(r[0]) for r in (await conn.execute(query)).all()]


def publisher_env(server: Server, prefix: str, batch: int) -> dict[str, str]:
    settings = server.services.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
    env.update(
        TRUSTPLANE_ISSUER=settings.issuer,
        TRUSTPLANE_DATABASE_URL=settings.effective_database_url,
        TRUSTPLANE_DATA_DIR=str(settings.data_dir),
        TRUSTPLANE_KEY_ENCRYPTION_KEY=KEK,
        TRUSTPLANE_KEY_ROTATION_INTERVAL="0",
        TRUSTPLANE_LOG_LEVEL="warning",
        TRUSTPLANE_EVENTS_NATS_URL=NATS,
        TRUSTPLANE_EVENTS_SUBJECT_PREFIX=prefix,
        TRUSTPLANE_EVENTS_PUBLISH_BATCH=str(batch),
    )
    return env


@pytest.mark.postgres
async def test_a_publisher_killed_mid_drain_loses_nothing_and_duplicates_nothing(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    prefix: str,
    js: Any,
) -> None:
    async with running_server(request, tmp_path_factory, "postgresql") as server:
        await revocations(server, 1000)
        ids = await security_event_ids(server.services.db)
        outbox, _ = publisher_for(server, prefix)
        env = publisher_env(server, prefix, batch=BATCH)
        command = [TRUSTPLANE, "events", "publish"]
        started = time.monotonic()
        first = await asyncio.create_subprocess_exec(*command, env=env, stdout=subprocess.DEVNULL)
        try:
            # kill inside a round: some of its events acked, its position not yet committed
            for _ in range(6000):
                count = await in_stream(js, prefix)
                if count >= BATCH and count % BATCH:
                    break
                await asyncio.sleep(0.005)
            first.send_signal(signal.SIGKILL)
        finally:
            await asyncio.wait_for(first.wait(), 10)
        killed = time.monotonic()
        at_kill = await in_stream(js, prefix)
        position = await outbox.position()
        assert 0 < at_kill < len(ids), "the publisher should die mid-drain"
        committed = sum(1 for i in await security_event_indices(server) if i < position)
        assert committed < at_kill  # acked, not recorded: these are published again below
        print(
            f"killed after {killed - started:.1f} s: {at_kill} in the stream, {committed} committed"
        )

        # two publishers at once on one database: one publishes at a time, none twice
        second, third = [
            await asyncio.create_subprocess_exec(*command, env=env, stdout=subprocess.DEVNULL)
            for _ in range(2)
        ]
        try:
            for _ in range(1500):
                if await outbox.position() == await size_of(server):
                    break
                await asyncio.sleep(0.02)
        finally:
            for proc in (second, third):
                proc.send_signal(signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), 10)
        assert await outbox.position() == await size_of(server)
        assert await in_stream(js, prefix) == len(ids)  # nothing lost, re-published ones dropped
        print(f"drained by two publishers in {time.monotonic() - killed:.1f} s")

        jwks = (await server.http.get("/jwks")).json()
        consumer = pyjwt_consumer(js, prefix, jwks, server.issuer)
        assert [e["jti"] for e in await consume_all(consumer, len(ids))] == ids
        assert consumer.refused == []


async def test_serve_publishes_from_its_component_loop(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    prefix: str,
    js: Any,
) -> None:
    """With ``events_nats_url`` set, the running server's ``security_events`` component drains the
    ledger into the stream by itself (no test-driven publisher)."""
    settings = {"events_nats_url": NATS, "events_subject_prefix": prefix}
    async with running_server(request, tmp_path_factory, "sqlite", **settings) as server:
        await revocations(server, 3)
        ids = await security_event_ids(server.services.db)
        for _ in range(300):
            if await in_stream(js, prefix) == len(ids):
                break
            await asyncio.sleep(0.05)
        assert await in_stream(js, prefix) == len(ids)
