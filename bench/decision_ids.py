#!/usr/bin/env python3
"""Random against time-ordered decision ids on a ``policy_decisions`` that has history (PostgreSQL).

``policy_decisions`` is keyed by the decision id and keeps ``policy_decision_retention_days`` (90)
of decisions: one row per token and per PDP decision. Its primary-key index outgrows the database's
buffers long before the retention period is up. With an id of 16 random bytes (before 2026-12-06)
every insert lands on a random leaf page of that index: a page read when it is not in the buffers,
and, the first time a page is changed after a checkpoint, a full-page image (8 KB) in the WAL. A
time-ordered id (``trustplane.audit_events.new_event_id``, a UUIDv7) inserts at the right edge.

Per variant a fresh database with the real table (``trustplane.policy.tables``), ``--prefill``
rows of history (ids of that variant, older times, no inputs), ``VACUUM ANALYZE``; then, per rep and
alternating the variants' order, a ``CHECKPOINT`` (the state right after one of the server's own,
every ``checkpoint_timeout``) and ``--inserts`` decisions with ~680-byte inputs in batches of
``--batch`` (about what the group-commit writer puts in one commit), with the recorder's own
statement, each batch committed. Reported per run: the backend's CPU per decision (``/proc``), WAL
bytes per decision and how many of them are full-page images (``pg_walinspect``, WAL of that
database only), index and heap blocks read from outside the buffers per decision
(``pg_statio_user_tables``), decisions/s, the index size.

  python bench/decision_ids.py --database-url postgresql://postgres@127.0.0.1:5432/test
  python bench/decision_ids.py --prefill 4000000 --inserts 60000 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from trustplane.audit_events import new_event_id
from trustplane.policy.recorder import _TYPED
from trustplane.storage.driver_sql import by_column, unnest_insert

TICK = os.sysconf("SC_CLK_TCK")
INPUTS = '{"request": "' + "i" * 660 + '"}'  # about a token decision's inputs
VARIANTS: dict[str, Callable[[], str]] = {
    "random": lambda: os.urandom(16).hex(),  # the id before 2026-12-06
    "ordered": new_event_id,
}
#: History of each variant made in SQL: random hex, or 12 hex digits of milliseconds + random.
PREFILL_ID = {
    "random": "md5(g::text || random()::text)",
    "ordered": "lpad(to_hex($2::bigint + g / 10), 12, '0') || substr(md5(g::text), 1, 20)",
}
CREATE = """
CREATE TABLE policy_decisions (
    decision_id varchar(32) PRIMARY KEY, time_ms bigint NOT NULL, bundle_version varchar(64) NOT NULL,
    action varchar(64) NOT NULL, principal varchar(300) NOT NULL, resource varchar(300) NOT NULL,
    allowed boolean NOT NULL, reason_ids varchar(500) NOT NULL, latency_us integer NOT NULL,
    correlation_id varchar(128), inputs text);
CREATE INDEX ix_policy_decisions_time ON policy_decisions (time_ms);
CREATE EXTENSION IF NOT EXISTS pg_walinspect;
"""


def url_for(base: str, name: str) -> str:
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=f"/{name}"))


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def prepare(base: str, name: str, variant: str, prefill: int) -> None:
    admin = await asyncpg.connect(base)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(url_for(base, name))
    try:
        await conn.execute(CREATE)
        start_ms = time.time_ns() // 1_000_000 - 86_400_000 * 30
        rows = (
            f"{PREFILL_ID[variant]}, $2::bigint + g / 10, 'v1', 'token:obtain', 'c', "
            "'order:create', true, 'permit-1', 50, NULL, NULL"
        )
        fill = f"INSERT INTO policy_decisions SELECT {rows} FROM generate_series(1, $1::bigint) g"  # noqa: S608 - constants
        await conn.execute(fill, prefill, start_ms)
        await conn.execute("VACUUM ANALYZE policy_decisions")
    finally:
        await conn.close()


async def measure(base: str, name: str, variant: str, inserts: int, batch: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url_for(base, name))
    try:
        make_id = VARIANTS[variant]
        sql = unnest_insert("policy_decisions", _TYPED)
        batches = []
        for _ in range(inserts // batch):
            rows = []
            for _ in range(batch):
                now = time.time_ns() // 1_000_000
                rows.append(
                    (make_id(), now, "v1", "token:obtain", "c", "order:create", True,
                     "permit-1", 50, None, INPUTS)
                )  # fmt: skip
            batches.append(by_column(rows, len(_TYPED)))
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        oid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
        await conn.execute("CHECKPOINT")
        io = "SELECT heap_blks_read, idx_blks_read FROM pg_statio_user_tables WHERE relname = $1"
        before_io = await conn.fetchrow(io, "policy_decisions")
        lsn = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        ticks, started = cpu_ticks(pid), time.perf_counter()
        for params in batches:
            await conn.execute(sql, *params)
        elapsed, used = time.perf_counter() - started, cpu_ticks(pid) - ticks
        end = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        await asyncio.sleep(0.6)  # the statistics collector's report interval (500 ms)
        after_io = await conn.fetchrow(io, "policy_decisions")
        wal = await conn.fetchrow(
            "SELECT coalesce(sum(record_length), 0), coalesce(sum(fpi_length), 0) "
            "FROM pg_get_wal_records_info($1::text::pg_lsn, $2::text::pg_lsn) "
            "WHERE block_ref LIKE $3",
            lsn,
            end,
            f"%/{oid}/%",
        )
        size = await conn.fetchval("SELECT pg_relation_size('policy_decisions_pkey')")
        done = len(batches) * batch
        return {
            "variant": variant,
            "per_s": done / elapsed,
            "cpu_us": used / TICK / done * 1e6,
            "wal_b": int(wal[0]) / done,
            "fpi_b": int(wal[1]) / done,
            "heap_reads": (after_io[0] - before_io[0]) / done,
            "idx_reads": (after_io[1] - before_io[1]) / done,
            "pk_mb": size / 2**20,
        }
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--prefill", type=int, default=3_000_000)
    parser.add_argument("--inserts", type=int, default=48_000)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    names = {v: f"tp_bench_ids_{v}_{tag}" for v in VARIANTS}
    try:
        for variant, name in names.items():
            started = time.perf_counter()
            await prepare(args.database_url, name, variant, args.prefill)
            print(
                f"{variant}: {args.prefill:,} rows of history in {time.perf_counter() - started:.0f} s"
            )
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for rep in range(args.reps):
            order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                r = await measure(
                    args.database_url, names[variant], variant, args.inserts, args.batch
                )
                results[variant].append(r)
                print(
                    f"  rep {rep + 1} {variant:8} {r['per_s']:8.0f}/s  cpu {r['cpu_us']:6.1f} us  "
                    f"wal {r['wal_b']:7.0f} B (full pages {r['fpi_b']:7.0f})  reads idx "
                    f"{r['idx_reads']:.3f} heap {r['heap_reads']:.3f}  pk {r['pk_mb']:.0f} MB  "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        print("medians per decision:")
        for variant, runs in results.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "variant"}
            print(
                f"  {variant:8} {med['per_s']:8.0f}/s  cpu {med['cpu_us']:6.1f} us  wal "
                f"{med['wal_b']:7.0f} B (full pages {med['fpi_b']:7.0f})  index reads "
                f"{med['idx_reads']:.3f}  pk {med['pk_mb']:.0f} MB"
            )
    finally:
        admin = await asyncpg.connect(args.database_url)
        try:
            for name in names.values():
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
