"""The pipelined publisher's failure cases (CI=true: the real NATS on 127.0.0.1:4222, answered by a
scripted stand-in for JetStream on subjects of the test's own prefix): an ack missing in the middle
of a round, a refusal, an ack later than the timeout, the connection closed mid-round. In each, the
outbox marks exactly the acked prefix, the rest is published again in the next round, and the
stand-in (deduplicating by ``Nats-Msg-Id`` as JetStream does) ends with every message once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats
import pytest

from tests.conftest import require_service
from trustplane.events.jetstream import Claim, JetStreamPublisher, Outgoing, PublishFailed

NATS = "nats://127.0.0.1:4222"
#: The publisher's connect timeout; it waits twice as long for a round's acks.
TIMEOUT = 0.25


class ListOutbox:
    """An in-memory outbox: ``published`` counts the marked prefix, ``marks`` each round's mark."""

    def __init__(self, messages: Sequence[Outgoing]) -> None:
        self.messages, self.published = list(messages), 0
        self.marks: list[int] = []

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[Claim]:
        claim = Claim(self.messages[self.published : self.published + limit])
        try:
            yield claim
        finally:
            self.marks.append(claim.acked)
            self.published += claim.acked


class StandIn:
    """Answers publishes on ``<prefix>.>`` as JetStream would, keeping each ``Nats-Msg-Id`` once
    (``stored``, in arrival order), except for the scripted (message id, attempt) pairs:
    ``"refuse"`` (an API error, nothing stored), ``"lose"`` (stored, the ack lost), ``"late"``
    (stored, acked after the publisher's timeout)."""

    def __init__(self, script: dict[tuple[str, int], str]) -> None:
        self.script = script
        self.stored: list[str] = []
        self.attempts: dict[str, int] = {}
        self.late: list[asyncio.Task[None]] = []

    async def handle(self, msg: Any) -> None:
        msg_id = msg.headers["Nats-Msg-Id"]
        attempt = self.attempts[msg_id] = self.attempts.get(msg_id, 0) + 1
        action = self.script.get((msg_id, attempt), "ack")
        if action == "refuse":
            await msg.respond(json.dumps({"error": {"code": 503, "description": "no"}}).encode())
            return
        duplicate = msg_id in self.stored
        if not duplicate:
            self.stored.append(msg_id)
        ack = json.dumps(
            {"stream": "S", "seq": self.stored.index(msg_id) + 1, "duplicate": duplicate}
        )
        if action == "late":
            self.late.append(asyncio.create_task(self._later(msg, ack.encode())))
        elif action == "ack":
            await msg.respond(ack.encode())

    async def _later(self, msg: Any, ack: bytes) -> None:
        await asyncio.sleep(TIMEOUT * 3)
        await msg.respond(ack)


@pytest.fixture
async def responder() -> AsyncIterator[tuple[str, Any]]:
    require_service("NATS", "127.0.0.1", 4222)
    prefix = f"p{secrets.token_hex(4)}"
    nc = await nats.connect(NATS)
    yield prefix, nc
    await nc.close()


async def stand_in(nc: Any, prefix: str, script: dict[tuple[str, int], str]) -> StandIn:
    fake = StandIn(script)
    await nc.subscribe(f"{prefix}.>", cb=fake.handle)
    await nc.flush()
    return fake


def messages(prefix: str, n: int) -> list[Outgoing]:
    return [Outgoing(f"{prefix}.e", f"event {i}".encode(), f"m{i}", 0.0) for i in range(n)]


async def drain(publisher: JetStreamPublisher, outbox: ListOutbox) -> list[str]:
    """Rounds until the outbox is marked through; the failures' texts."""
    failures: list[str] = []
    for _ in range(5):
        if outbox.published == len(outbox.messages):
            break
        try:
            await asyncio.wait_for(publisher.drain_once(), 10)  # a hang fails, never a timing
        except (PublishFailed, nats.errors.Error) as exc:
            failures.append(str(exc) or type(exc).__name__)
    await publisher.close()
    return failures


def publisher_of(outbox: ListOutbox, **options: Any) -> JetStreamPublisher:
    return JetStreamPublisher(outbox, NATS, [], connect_timeout=TIMEOUT, **options)


@pytest.mark.parametrize("action", ["lose", "refuse", "late"])
async def test_an_ack_missing_in_the_middle_marks_the_prefix_and_publishes_the_rest_again(
    responder: tuple[str, Any], action: str
) -> None:
    prefix, nc = responder
    sent = messages(prefix, 6)
    fake = await stand_in(nc, prefix, {("m2", 1): action})
    outbox = ListOutbox(sent)

    failures = await drain(publisher_of(outbox), outbox)

    assert outbox.marks == [2, 4]  # m0, m1 acked; m2 and everything after it published again
    assert len(failures) == 1
    assert sorted(fake.stored) == [m.msg_id for m in sent]  # each once, none lost
    assert fake.attempts == {"m0": 1, "m1": 1, "m2": 2, "m3": 2, "m4": 2, "m5": 2}
    for task in fake.late:
        await task


async def test_the_connection_closed_mid_round_marks_what_was_acked_before(
    responder: tuple[str, Any],
) -> None:
    prefix, nc = responder
    sent = messages(prefix, 6)
    fake = await stand_in(nc, prefix, {})
    outbox = ListOutbox(sent)

    class Closing(JetStreamPublisher):
        """Closes its first connection right after that connection's third ack (the acks after
        it, already on their way, are dropped as a closing connection may drop them)."""

        acks, first = 0, None

        async def _answered(self, msg: Any) -> None:
            if self.first is None:
                self.first = self._nc
            if self._nc is not self.first:
                await super()._answered(msg)
                return
            self.acks += 1
            if self.acks <= 3:
                await super()._answered(msg)
            if self.acks == 3:
                asyncio.get_running_loop().create_task(self.first.close())

    publisher = Closing(outbox, NATS, [], connect_timeout=TIMEOUT)
    failures = await drain(publisher, outbox)

    assert outbox.marks == [3, 3]  # m0-m2 marked; m3-m5 published again on a new connection
    assert len(failures) == 1
    assert sorted(fake.stored) == [m.msg_id for m in sent]


async def test_a_round_larger_than_the_window_waits_for_each_window_in_turn(
    responder: tuple[str, Any],
) -> None:
    prefix, nc = responder
    sent = messages(prefix, 7)
    fake = await stand_in(nc, prefix, {("m3", 1): "refuse"})
    outbox = ListOutbox(sent)

    failures = await drain(publisher_of(outbox, in_flight=2), outbox)

    # windows m0-m1, m2-m3 (m3 refused): m4.. never sent in the first round
    assert outbox.marks == [3, 4]
    assert len(failures) == 1
    assert fake.attempts == {"m0": 1, "m1": 1, "m2": 1, "m3": 2, "m4": 1, "m5": 1, "m6": 1}
    assert sorted(fake.stored) == [m.msg_id for m in sent]
