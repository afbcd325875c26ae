#!/usr/bin/env python3
"""How fast the surveillance detector reads the ledger: --entries integrated ``oauth:token:issued``
entries spread over --clients clients (one in --exchange-every a token exchange with an actor
chain; 0: none), each followed by a ``policy:decision:allowed`` entry with --decisions (as a token
request appends them), then the detector catches up from leaf 0 in rounds of --batch; prints
leaves/s, ms per round, this process's CPU per leaf (the database's own CPU not included) and
the longest time a round kept the event loop from other work (a 1 ms sleep's lateness).

  python bench/surveillance.py                                     # SQLite in a temp dir
  python bench/surveillance.py --database postgresql://postgres@127.0.0.1:5432/mydb   # migrated
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import truncate_all
from tests.surveillance.rig import ISSUER, T0, Rig, issued
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.startup import freeze_after_start
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database or f"sqlite+aiosqlite:///{tmp}/bench.db"
        if args.database:
            await truncate_all(url)
        else:
            db = Database(url)
            await upgrade(db)
            await db.dispose()
        rig = await Rig.open(url, Path(tmp), surveillance_batch=args.batch)
        try:
            every = args.exchange_every
            for start in range(0, args.entries, 5000):
                await rig.append(
                    *(
                        event
                        for n in range(start, min(args.entries, start + 5000))
                        for event in _token(n, args.clients, every and n % every == 0, args)
                    )
                )
            detector = rig.detector()
            freeze_after_start()  # as a server process does: what the set-up made is not scanned
            leaves = args.entries * (2 if args.decisions else 1)
            lags: list[float] = []
            probe = asyncio.create_task(_probe(lags))
            rounds, started, cpu = 0, time.perf_counter(), time.process_time()
            while (done := await detector.round()) is not None and done.read:
                rounds += 1
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            probe.cancel()
            lags.sort()
            kind = "PostgreSQL" if args.database else "SQLite"
            print(
                f"{kind}: {leaves} leaves, {args.clients} clients, batch {args.batch}: "
                f"{seconds:.2f} s, {leaves / seconds:,.0f} leaves/s, "
                f"{1000 * seconds / max(rounds, 1):.1f} ms per round ({rounds} rounds), "
                f"CPU {1e6 * cpu / leaves:.1f} us per leaf, event loop held up to "
                f"{1000 * lags[-1]:.1f} ms (p99 {1000 * lags[int(len(lags) * 0.99)]:.1f})"
            )
        finally:
            await rig.close()


async def _probe(lags: list[float]) -> None:
    """How late a 1 ms sleep wakes: the longest stretch the round keeps the event loop (and so
    every request of a server's process) waiting."""
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - asked - 0.001)


def _token(n: int, clients: int, exchange: bool, args: argparse.Namespace) -> list[AuditEvent]:
    client = f"c-{n % clients}"
    token = issued(
        client,
        T0 + n * 10,
        actors=(f"svc-{n % 7}",) if exchange else (),
        subject=f"s-{n % 13}",
    )
    if not args.decisions:
        return [token]
    decision = AuditEvent(
        type=AuditEventType.POLICY_DECISION_ALLOWED,
        issuer=ISSUER,
        client_id=client,
        decision="allow",
        reason_ids=("token.registered_scope",),
        time=T0 + n * 10,
    )
    return [token, decision]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--database", default="")
    parser.add_argument("--exchange-every", type=int, default=10)
    parser.add_argument("--decisions", action="store_true", help="a decision entry per token")
    asyncio.run(main(parser.parse_args()))
