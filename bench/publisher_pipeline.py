"""The JetStream publisher alone, counted: an in-memory outbox of ``--events`` trade-event-sized
messages drained by :class:`JetStreamPublisher` in claims of ``--per-claim`` into a stream of its
own (unique prefix, deleted after) on the real NATS. Run it under callgrind (or ``--profile`` for
cProfile's call counts), once with ``--events 0`` (the same warm-up round, nothing after it), and
subtract: what is left is the publisher's cost for the events.

    PYTHONPATH=src valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        python bench/publisher_pipeline.py --events 300 --per-claim 6
    PYTHONPATH=<old tree>/src python bench/publisher_pipeline.py --events 300 --profile

``PYTHONPATH`` picks the tree measured (an old one for an A/B).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import secrets
from collections.abc import AsyncIterator
from typing import Any

from trustplane.events.jetstream import Claim, JetStreamPublisher, Outgoing, Stream

#: About a trade event's compact JWS (ES256, a lifecycle step's claims).
PAYLOAD = 900


class ListOutbox:
    """Claims of at most ``per_claim`` messages; the acked prefix is marked."""

    def __init__(self, messages: list[Outgoing], per_claim: int) -> None:
        self.messages, self.per_claim, self.published = messages, per_claim, 0

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[Claim]:
        end = self.published + min(limit, self.per_claim)
        claim = Claim(self.messages[self.published : end])
        try:
            yield claim
        finally:
            self.published += claim.acked


def outgoing(prefix: str, n: int, start: int = 0) -> list[Outgoing]:
    data = secrets.token_urlsafe(PAYLOAD)[:PAYLOAD].encode()
    return [
        Outgoing(f"{prefix}.order.created", data, f"{prefix}-{i}", 0.0)
        for i in range(start, start + n)
    ]


async def drain(publisher: JetStreamPublisher, outbox: ListOutbox) -> None:
    while outbox.published < len(outbox.messages):
        await publisher.drain_once()


async def main(args: Any) -> None:
    import nats

    prefix = f"pp{secrets.token_hex(4)}"
    stream = Stream(prefix.upper(), (f"{prefix}.>",))
    warm = ListOutbox(outgoing(prefix, args.per_claim), args.per_claim)
    publisher = JetStreamPublisher(warm, args.nats, [stream])
    try:
        await drain(publisher, warm)  # connection, stream, reply subscription: in both runs
        outbox = ListOutbox(outgoing(prefix, args.events, args.per_claim), args.per_claim)
        publisher.outbox = outbox
        profile = cProfile.Profile() if args.profile else None
        if profile is not None:
            profile.enable()
        await drain(publisher, outbox)
        if profile is not None:
            profile.disable()
            stats = pstats.Stats(profile)
            calls = sum(row[1] for row in stats.stats.values())  # type: ignore[attr-defined]
            print(f"calls {calls} for {args.events} events")
            if args.top:
                stats.sort_stats("tottime").print_stats(args.top)
    finally:
        await publisher.close()
        nc = await nats.connect(args.nats)
        js = nc.jetstream()
        count = (await js.stream_info(stream.name)).state.messages
        await js.delete_stream(stream.name)
        await nc.close()
    print(f"stream {stream.name}: {count} messages (deleted)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--per-claim", type=int, default=6)
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured rounds")
    parser.add_argument("--top", type=int, default=0, help="with --profile: print the top N")
    asyncio.run(main(parser.parse_args()))
