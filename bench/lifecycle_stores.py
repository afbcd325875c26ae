"""The reference services' store side of a lifecycle in one process, without HTTP: ``TradeServices``
over four PostgreSQL databases (one store per service) with the embedded hand-off, a local
allow-all PDP and mandate check. What it measures is what ``reference/`` itself costs per
lifecycle: this process's CPU (the services, the stores, the hand-off) and the CPU of the
PostgreSQL backends of the four databases, with no authorization server, PDP or uvicorn beside it,
so that two versions of the code compare with little of the machine's noise (bench/lifecycle.py
measures every process).

    PYTHONPATH=src python bench/lifecycle_stores.py --lifecycles 300 --concurrency 1 4

The four databases (``<--db-prefix>_<tag>_<service>``, default ``tp_lcstore``) are made fresh and
dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _cluster
from _cluster import ticks as process_ticks

from trustplane.authzen.model import Decision, Entity
from trustplane.reference import machine
from trustplane.reference.entitlement import MandateStatus
from trustplane.reference.events import EventSigner
from trustplane.reference.handoff import Dispatcher, Upstream
from trustplane.reference.services import Caller, ServiceStores, TradeServices
from trustplane.reference.store import TradeStore
from trustplane.storage.db import Database

ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
ISSUER = "https://settle.bench.invalid"
ORDER = {
    "account": "ACC-1", "instrument": "BOND-1", "side": "buy", "quantity": "1000",
    "amount": "1000000", "currency": "EUR",
}  # fmt: skip
ALLOC = [{"account": "SUB-1", "quantity": "1000"}]
TICK = os.sysconf("SC_CLK_TCK")


async def allow(action: str, resource: Entity, context: Mapping[str, Any]) -> Decision:
    return Decision(True, ("bench",), "bench", uuid.uuid4().hex)


class Live:
    async def check(
        self, token: str | None, claims: Mapping[str, Any], envelope: Mapping[str, Any]
    ) -> MandateStatus:
        return MandateStatus(True, "active", "usable", envelope.get("mandate"))


def caller(subject: str) -> Caller:
    claims = {
        "iss": "https://as.bench.invalid", "jti": f"tok-{subject}", "sub": subject,
        "client_id": "desk", "txn": "txn-1", "mandate": {"id": "M-1", "version": 1},
    }  # fmt: skip
    return Caller(subject, claims, "raw", allow)


async def lifecycle(s: TradeServices, n: int) -> None:
    trade = await s.create_order(caller("alice"), ORDER, f"o-{n}")
    await s.execute(caller("broker"), trade.trade_id, f"e-{n}")
    await s.propose_allocation(caller("alice"), trade.trade_id, ALLOC, f"p-{n}")
    await s.approve_allocation(caller("bob"), trade.trade_id, f"a-{n}")
    await s.submit_settlement(caller("clearing"), trade.trade_id, {"ssi": "X"}, f"s-{n}")
    await s.confirm_settlement(caller("clearing"), trade.trade_id, "settled", f"c-{n}")


async def phase(s: TradeServices, count: int, concurrency: int, start: int) -> None:
    todo = iter(range(start, start + count))

    async def worker() -> None:
        for n in todo:
            await lifecycle(s, n)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lifecycles", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--db-prefix", default="tp_lcstore", help="of the four databases' names")
    args = parser.parse_args()
    tag = f"{args.db_prefix}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(ADMIN)
    names = {s: f"{tag}_{s}" for s in machine.SERVICES}
    for name in names.values():
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        stores: dict[str, TradeStore] = {}
        for s, name in names.items():
            signer = EventSigner.generate(ISSUER) if s in machine.OWNERS else None
            url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
            stores[s] = TradeStore(Database(url), signer, service=s)
            await stores[s].create_schema()
        split = ServiceStores(**stores)
        ups = [Upstream(o, stores[o], ISSUER, stores[o].signer.jwks()) for o in machine.OWNERS]
        services = TradeServices(split, Live(), handoff=Dispatcher.between(stores, ups))
        await phase(services, 20, 4, 0)  # warm: pools, prepared statements
        start = 20
        for concurrency in args.concurrency:
            rows = await admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[])",
                list(names.values()),
            )
            pids = [r["pid"] for r in rows]
            ticks, cpu, wall = (
                process_ticks(pids),
                resource.getrusage(resource.RUSAGE_SELF),
                time.perf_counter(),
            )
            await phase(services, args.lifecycles, concurrency, start)
            start += args.lifecycles
            wall = time.perf_counter() - wall
            after = resource.getrusage(resource.RUSAGE_SELF)
            rows = await admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[])",
                list(names.values()),
            )
            pg = (process_ticks([r["pid"] for r in rows]) - ticks) / TICK
            own = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
            per = 1000 / args.lifecycles
            print(
                f"concurrency {concurrency}: {args.lifecycles / wall:.1f} lifecycles/s, CPU ms per "
                f"lifecycle: services {own * per:.2f}, PostgreSQL {pg * per:.2f}, "
                f"total {(own + pg) * per:.2f}; load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        for store in split.distinct():
            await store.db.dispose()
    finally:
        for name in names.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
