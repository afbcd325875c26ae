#!/usr/bin/env python3
"""What idle ``trustplane serve`` processes cost PostgreSQL on a database with large tables: the CPU
of the database's backends (from /proc) and of the servers, per second, over a window that holds one
maintenance round (every minute), and what each table was read by (``pg_stat_user_tables``:
sequential scans and the rows they read, index scans), with the load average.

The database is an existing one (``--database``, e.g. filled with ``generate_series``: the tables'
statistics are what they are, ANALYZEd or not); the servers only read it while idle.

  PYTHONPATH=$TREE/src python bench/idle_scans.py --database tp_scans_big --seconds 62
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import pg_backends, psql, ticks

from tests.e2e.conftest import running_servers

TICK = os.sysconf("SC_CLK_TCK")
TABLE_STATS = (
    "SELECT relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0) "
    "FROM pg_stat_user_tables"
)


def table_stats(db: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for line in psql(db, TABLE_STATS).splitlines():
        name, *counts = line.split("|")
        out[name] = tuple(int(c) for c in counts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--database", required=True)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=62.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument(
        "--kek", required=True, help="the database's key-encryption key (same every run)"
    )
    args = ap.parse_args()
    url = f"postgresql://postgres@127.0.0.1:5432/{args.database}"
    with tempfile.TemporaryDirectory() as work, running_servers(Path(work)) as servers:
        issuer = "http://127.0.0.1:18765"  # one issuer (one ledger key) for every run
        cluster = servers.start_cluster(
            args.servers, url, key_encryption_key=args.kek, issuer=issuer
        )
        spids = [s.process.pid for s in cluster]  # type: ignore[union-attr]
        time.sleep(args.settle)
        load0 = os.getloadavg()
        stats0 = table_stats(args.database)
        # every backend's ticks at the start (0 for one opened later) and when last seen: the
        # backends are sampled every 0.5 s, so one opened and closed between samples is missed
        first = {pid: ticks([pid]) for pid in pg_backends(args.database)}
        last = dict(first)
        t0, srv0 = time.monotonic(), ticks(spids)
        while time.monotonic() - t0 < args.seconds:
            time.sleep(0.5)
            for pid in pg_backends(args.database):
                first.setdefault(pid, 0)
                last[pid] = ticks([pid]) or last.get(pid, 0)
        dt = time.monotonic() - t0
        pg_ms = sum(last[p] - first[p] for p in last) * 1000 / TICK / dt
        srv_ms = (ticks(spids) - srv0) * 1000 / TICK / dt
        stats1 = table_stats(args.database)
        print(
            f"servers {args.servers}: PostgreSQL {pg_ms:.2f} CPU ms/s ({len(last)} backends seen), "
            f"servers {srv_ms:.2f} CPU ms/s, {dt:.0f} s"
        )
        print("table: seq scans, rows they read, index scans, rows fetched (in the window)")
        for name in sorted(stats1):
            delta = [
                b - a for a, b in zip(stats0.get(name, (0, 0, 0, 0)), stats1[name], strict=True)
            ]
            if any(delta):
                print(f"  {name}: {' '.join(str(d) for d in delta)}")
        print(f"load {' '.join(f'{x:.2f}' for x in load0)} -> "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
