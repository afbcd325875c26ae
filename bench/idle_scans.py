#!/usr/bin/env python3
"""What idle ``trustplane serve`` processes cost PostgreSQL on a database with large tables: the CPU
of the database's backends (from /proc) and of the servers, per second, over a window that holds one
maintenance round (every minute), and what each table was read by (``pg_stat_user_tables``:
sequential scans and the rows they read, index scans), with the load average.

The database is an existing one (``--database``, e.g. filled with ``generate_series``: the tables'
statistics are what they are, ANALYZEd or not); the servers only read it while idle.

  PYTHONPATH=$TREE/src python bench/idle_scans.py --database tp_scans_big --seconds 62

``--prune-windows`` measures one periodic statement instead, the surveillance windows' prune
(``store.prune_windows``, each minute in every process), on a scratch database migrated by the
tree's own code and filled with ``--keys`` x ``--buckets`` windows of each of two signals (never
ANALYZEd, or ``--analyze``): ``--rounds`` prunes that each delete one bucket (KEYS windows: the
minute a window length passes) and as many that find nothing due (the other minutes); per round,
the CPU of the database backend that ran them (from /proc) and, for one more round planned and run
under ``EXPLAIN (ANALYZE, BUFFERS)`` and rolled back, the buffers it touched and the rows it read.

  PYTHONPATH=$TREE/src python bench/idle_scans.py --prune-windows --keys 200 --buckets 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

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


SIGNAL, OTHER = "issuance.spike", "partner.claim_failures"
FIRST_BUCKET = 5_000_000


async def _captured(conn: Any, run: Any) -> tuple[Any, list[tuple[str, Any]]]:
    """What ``run()`` returned and the DELETE statements it ran, with their parameters."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def record(_c: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            seen.append((statement, parameters))

    event.listen(conn.sync_connection, "before_cursor_execute", record)
    try:
        return await run(), seen
    finally:
        event.remove(conn.sync_connection, "before_cursor_execute", record)


async def _explained(conn: Any, before: int) -> str:
    """One more prune, planned and run under EXPLAIN (ANALYZE, BUFFERS), rolled back."""
    from trustplane.surveillance import store

    trans = await conn.begin()
    try:
        _, seen = await _captured(conn, lambda: store.prune_windows(conn, SIGNAL, before))
        ((sql, params),) = seen
        await conn.rollback()
        await conn.begin()
        rows = await conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params)
        return "\n".join(r[0] for r in rows.all())
    finally:
        if trans.is_active or conn.in_transaction():
            await conn.rollback()


async def _prune_windows(args: argparse.Namespace) -> None:
    from trustplane.storage.db import Database
    from trustplane.storage.migrate import upgrade
    from trustplane.surveillance import store

    name = f"tp_bench_windows_{uuid.uuid4().hex[:8]}"
    psql("postgres", f'CREATE DATABASE "{name}"')
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}")
    try:
        await upgrade(db)
        last = FIRST_BUCKET + args.buckets - 1
        fill = (
            "INSERT INTO surveillance_windows SELECT s, 'client-' || k, b, 3, 1, NULL "  # noqa: S608
            f"FROM (VALUES ('{SIGNAL}'), ('{OTHER}')) v(s), generate_series(1, {args.keys}) k, "
            f"generate_series({FIRST_BUCKET}, {last}) b"
        )
        psql(name, fill)
        if args.analyze:
            psql(name, "ANALYZE surveillance_windows")
        print(f"{2 * args.keys * args.buckets} windows ({args.keys} keys x {args.buckets} "
              f"buckets x 2 signals), {'ANALYZEd' if args.analyze else 'no statistics'}")  # fmt: skip
        async with db.engine.connect() as conn:
            pid = int((await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one())
            await conn.rollback()
            befores = {
                "one bucket due": [FIRST_BUCKET + 1 + i for i in range(args.rounds)],
                "nothing due": [FIRST_BUCKET + args.rounds] * args.rounds,
            }
            for phase, bounds in befores.items():
                t0, w0, deleted = ticks([pid]), time.perf_counter(), 0
                for before in bounds:
                    async with conn.begin():
                        deleted += await store.prune_windows(conn, SIGNAL, before)
                cpu = (ticks([pid]) - t0) * 1000 / TICK / len(bounds)
                wall = (time.perf_counter() - w0) * 1000 / len(bounds)
                plan = await _explained(conn, bounds[-1] + (1 if phase != "nothing due" else 0))
                hit = sum(int(x) for x in re.findall(r"shared hit=(\d+)", plan.split("\n")[1]))
                read = re.findall(r"Rows Removed by Filter: (\d+)", plan)
                print(f"  {phase}: {deleted / len(bounds):.0f} windows deleted a round, backend "
                      f"CPU {cpu:.2f} ms, wall {wall:.2f} ms a round; EXPLAIN: {hit} buffers hit "
                      f"(first node), rows removed by filter {read or 0}", flush=True)  # fmt: skip
                if args.plans:
                    print(plan)
    finally:
        await db.dispose()
        psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--database")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=62.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--kek", help="the database's key-encryption key (same every run)")
    ap.add_argument("--prune-windows", action="store_true")
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--buckets", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--analyze", action="store_true")
    ap.add_argument("--plans", action="store_true", help="print the EXPLAIN of each phase")
    args = ap.parse_args()
    if args.prune_windows:
        asyncio.run(_prune_windows(args))
        return
    if not args.database or not args.kek:
        ap.error("--database and --kek are required (unless --prune-windows)")
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
