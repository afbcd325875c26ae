#!/usr/bin/env python3
"""CPU of two idle ``trustplane serve`` processes on PostgreSQL, as ``bench/lifecycle.py`` starts them
(one database, one issuer, the cache refresh interval at its default): settle, then CPU ms/s,
context switches/s of each process from /proc over ``--seconds``, with the load average.

  PYTHONPATH=$TREE/src python bench/idle_pg.py --seconds 20 [--hold 40]   # --hold: time for py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_endpoint import _create_pg_database

from tests.e2e.conftest import running_servers

TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if "ctxt_switches" in line:
                total += int(line.split()[1])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=8.0)
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to stay up after measuring")
    args = ap.parse_args()
    from trustplane.storage.db import Database
    from trustplane.storage.migrate import upgrade

    name = f"tp_bench_idle_{uuid.uuid4().hex[:8]}"
    url = f"{args.database_url.rsplit('/', 1)[0]}/{name}"
    asyncio.run(_create_pg_database(args.database_url, name))
    try:

        async def migrate() -> None:
            db = Database(url)
            await upgrade(db)
            await db.dispose()

        asyncio.run(migrate())
        with tempfile.TemporaryDirectory() as work, running_servers(Path(work)) as servers:
            auth, pdp = servers.start_cluster(2, url, cache_refresh_interval="1")
            pids = {"auth": auth.process.pid, "pdp": pdp.process.pid}  # type: ignore[union-attr]
            print(f"pids {pids}", flush=True)
            time.sleep(args.settle)
            load0 = os.getloadavg()
            t0, c0, s0 = time.monotonic(), {}, {}
            for k, pid in pids.items():
                c0[k], s0[k] = cpu_ticks(pid), switches(pid)
            time.sleep(args.seconds)
            dt = time.monotonic() - t0
            for k, pid in pids.items():
                ms = (cpu_ticks(pid) - c0[k]) * 1000 / TICK / dt
                sw = (switches(pid) - s0[k]) / dt
                print(f"{k}: {ms:.2f} CPU ms/s, {sw:.1f} context switches/s")
            print(f"load {' '.join(f'{x:.2f}' for x in load0)} -> "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
            time.sleep(args.hold)
    finally:
        asyncio.run(_create_pg_database(args.database_url, name, True))


if __name__ == "__main__":
    main()
