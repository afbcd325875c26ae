#!/usr/bin/env python3
"""The mandate usability check on the hot path (code redemption, refresh, introspection).

In process, on a fresh SQLite file (or --database-url): creates --mandates active mandates, then
times ``MandateService.check_usable`` three ways in the same run:

  cached     the in-memory head + version cache (what a running server does between changes);
  uncached   the cache dropped before every call: one primary-key read of the head and one of the
             version (what the first check after a cross-process change costs);
  baseline   ``Database.read()`` + ``SELECT 1``: the cheapest possible round trip, for the ratio.

Prints checks/s and p50/p99 per mode. Single-threaded asyncio; on a loaded machine the absolute
numbers move, the ratios much less.

  python bench/mandate_check.py
  python bench/mandate_check.py --database-url postgresql://postgres@127.0.0.1:5432/bench_db
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

from trustplane.app import Services
from trustplane.keys.crypto import new_kek_text, public_jwk
from trustplane.logging import configure_logging
from trustplane.mandates.model import MandateTerms
from trustplane.settings import Settings
from trustplane.storage.migrate import upgrade

GRANTOR = "529900T8BM49AURSDO55"
LEI = "5493001KJTIIGC8Y1R12"


async def timed(n: int, fn: Callable[[int], Awaitable[Any]]) -> tuple[float, list[float]]:
    latencies = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        await fn(i)
        latencies.append(time.perf_counter() - t0)
    return n / (time.perf_counter() - start), latencies


def report(name: str, rate: float, latencies: list[float], baseline: float | None) -> None:
    q = statistics.quantiles(latencies, n=100)
    ratio = f"  x{rate / baseline:.1f} vs baseline" if baseline else ""
    print(
        f"{name:<10} {rate:>10,.0f} checks/s   p50 {q[49] * 1e6:>7.1f} us   p99 {q[98] * 1e6:>7.1f} us{ratio}"
    )


async def main(args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    configure_logging("error", "console")
    data = Path(tempfile.mkdtemp(prefix="tp-bench-mandates-"))
    url = args.database_url or f"sqlite+aiosqlite:///{data / 'trustplane.db'}"
    settings = Settings(
        database_url=url, data_dir=data, key_encryption_key=new_kek_text(), log_level="error"
    )
    svc = Services.build(settings)
    await upgrade(svc.db)
    await svc.start()
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        jwks = {"keys": [{**public_jwk(key), "kid": "k1", "alg": "ES256", "use": "sig"}]}
        reg = await svc.clients.register(
            {
                "lei": LEI,
                "scope": "order:create",
                "allowed_resources": ["https://execution.example/api"],
                "jwks": jwks,
            },
            initial_access_token=None,
        )
        client_id = reg.client.client_id
        until = int(time.time()) + 86400
        ids = [
            (await svc.mandates.create(
                MandateTerms(GRANTOR, client_id, ("order:create",), effective_until=until),
                actor="bench", accepted_by="bench",
            )).id
            for _ in range(args.mandates)
        ]  # fmt: skip
        pick = random.Random(7)

        async def baseline(_: int) -> None:
            async with svc.db.read() as conn:
                await conn.execute(text("SELECT 1"))

        async def cached(_: int) -> None:
            await svc.mandates.check_usable(pick.choice(ids), 1)

        async def uncached(_: int) -> None:
            svc.mandates.invalidate()
            svc.mandates._versions.clear()
            await svc.mandates.check_usable(pick.choice(ids), 1)

        for fn in (baseline, cached, uncached):  # warm-up
            await timed(200, fn)
        base_rate, base_lat = await timed(args.requests // 10, baseline)
        print(f"database: {url.split('@')[-1]}   mandates: {args.mandates}")
        report("baseline", base_rate, base_lat, None)
        rate, lat = await timed(args.requests, cached)
        report("cached", rate, lat, base_rate)
        rate, lat = await timed(args.requests // 10, uncached)
        report("uncached", rate, lat, base_rate)
    finally:
        await svc.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default="")
    parser.add_argument("--mandates", type=int, default=500)
    parser.add_argument("--requests", type=int, default=50_000)
    asyncio.run(main(parser.parse_args()))
