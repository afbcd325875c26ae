"""The outbox publisher alone, on PostgreSQL and JetStream: CPU per event of this process (the
committing loop and the publisher) and of the store's PostgreSQL backends, with a round's mark
made alone after each round (``--variant alone``, as before ``TradeStore.mark_then_unpublished``)
or carried into the next round's read (``carried``, the default publisher), alternated per rep.

    PYTHONPATH=src python bench/lifecycle_publisher.py --events 600 --rate 200 --reps 6

Events are committed at ``--rate`` per second (``TradeStore.create``, one order each: its own
commit and the outbox trigger's ``NOTIFY``), as a lifecycle's steps reach an owner's store; a rep
ends when the outbox is drained. The committing code is the same in both variants, so the
difference is the publisher's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' order
sys.path.insert(0, str(Path(__file__).resolve().parent))  # token_endpoint

from token_endpoint import TICK, _create_pg_database

from tests.reference.conftest import ORDER
from trustplane.reference import jetstream
from trustplane.reference.events import Envelope, EventSigner
from trustplane.reference.store import TradeStore
from trustplane.storage.db import Database


def _ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def _backends(admin: Any, name: str) -> dict[int, int]:
    rows = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
    )
    found = {}
    for row in rows:
        with contextlib.suppress(OSError):
            found[row["pid"]] = _ticks(row["pid"])
    return found


class _Never:
    """``_TradeOutbox.carry`` for the ``alone`` variant: never carried, every mark made at once."""

    def __get__(self, obj: Any, owner: Any = None) -> bool:
        return False

    def __set__(self, obj: Any, value: bool) -> None:
        pass


async def _drop_streams(nats_url: str, prefix: str) -> None:
    import nats

    nc = await nats.connect(nats_url)
    for domain in jetstream.DOMAINS:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(jetstream.stream_name(prefix, domain))
    await nc.close()


async def rep(
    store: TradeStore, admin: Any, name: str, args: Any, variant: str
) -> dict[str, float]:
    prefix = f"b{secrets.token_hex(4)}"
    saved = jetstream._TradeOutbox.__dict__.get("carry")
    if variant == "alone":
        jetstream._TradeOutbox.carry = _Never()  # type: ignore[assignment]
    publisher = jetstream.OutboxPublisher(store, args.nats_url, prefix=prefix)
    stopping = asyncio.Event()
    task = asyncio.create_task(publisher.run(stopping))
    envelope = Envelope("txn-1", "alice", "desk", mandate={"id": "M-1", "version": 1})
    try:
        await asyncio.sleep(1.0)  # listening
        pg0, cpu0, t0 = await _backends(admin, name), time.process_time(), time.monotonic()
        for i in range(args.events):
            await store.create(str(uuid.uuid4()), ORDER, "alice", envelope, None)
            await asyncio.sleep(max(0.0, t0 + (i + 1) / args.rate - time.monotonic()))
        while await store.unpublished(1):  # noqa: ASYNC110 - the database is the truth
            await asyncio.sleep(0.01)
        cpu, pg1 = time.process_time() - cpu0, await _backends(admin, name)
        pg = sum(t - pg0.get(pid, 0) for pid, t in pg1.items()) / TICK
    finally:
        stopping.set()
        await task
        await publisher.close()
        await _drop_streams(args.nats_url, prefix)
        if variant == "alone":
            del jetstream._TradeOutbox.carry  # type: ignore[attr-defined]
            if saved is not None:
                jetstream._TradeOutbox.carry = saved  # type: ignore[attr-defined]
    n = args.events
    return {"process_us": cpu / n * 1e6, "pg_us": pg / n * 1e6}


async def main(args: Any) -> None:
    import asyncpg

    name = f"{args.db_prefix}_{secrets.token_hex(4)}"
    server = args.database_url.rsplit("/", 1)[0]
    await _create_pg_database(args.database_url, name)
    admin = await asyncpg.connect(args.database_url.replace("+asyncpg", ""))
    store = TradeStore(Database(f"{server}/{name}"), EventSigner.generate("https://b.invalid"))
    try:
        await store.create_schema()
        results: dict[str, list[dict[str, float]]] = {"alone": [], "carried": []}
        for i in range(args.reps):
            order = ("alone", "carried") if i % 2 == 0 else ("carried", "alone")
            for variant in order:
                got = await rep(store, admin, name, args, variant)
                results[variant].append(got)
                print(f"rep {i} {variant:8s} process {got['process_us']:6.0f} us/event, "
                      f"PostgreSQL {got['pg_us']:6.0f} us/event", flush=True)  # fmt: skip
        for variant, runs in results.items():
            proc = statistics.median(r["process_us"] for r in runs)
            pg = statistics.median(r["pg_us"] for r in runs)
            print(
                f"median {variant:8s} process {proc:6.0f} us/event, PostgreSQL {pg:6.0f} us/event"
            )
    finally:
        await store.db.dispose()
        await admin.close()
        await _create_pg_database(args.database_url, name, True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--db-prefix", default="tp_bench_pub")
    ap.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    ap.add_argument("--events", type=int, default=600)
    ap.add_argument("--rate", type=float, default=200.0, help="commits per second")
    ap.add_argument("--reps", type=int, default=6)
    import uvloop

    uvloop.run(main(ap.parse_args()))
