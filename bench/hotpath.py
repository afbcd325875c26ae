#!/usr/bin/env python3
"""The token hot path, this tree against a baseline tree, alternated in one run.

Both trees run as ``trustplane serve --workers N`` from the same virtualenv, each with its own
sources first on ``PYTHONPATH`` (the baseline: a ``git worktree`` of an earlier commit, e.g.
``git worktree add --detach ../hotpath-base b0f15a1``), each on its own SQLite file or fresh
PostgreSQL database. Load as in ``bench/token_endpoint.py``: client_credentials with a fresh ES256
private_key_jwt assertion per request, wrk on loopback. Per store the two servers run side by side
and the measured runs alternate (ours, base, base, ours, ...), after each run waiting until both
servers are idle again (the ledger's sequencer integrates what the run appended), so that one
server's background work is not charged to the other.

Per run: tokens/s, p50/p99, server CPU per token (the server's process tree), PostgreSQL CPU per
token (the backends connected to that server's database), the server's ``write`` system calls per
token (responses and statements; ``/proc/<pid>/io``), requests per commit (the group-commit
writer's ``trustplane_group_commit_batch_size`` histogram, scraped from /metrics before and after),
and the 1-minute load average. Medians per (store, tree, connections) at the end, and one JSON line
per run with ``--json``.

``--pg-count``: each PostgreSQL server reaches its database through a counting proxy
(bench/_pgcount.py), and each run also reports per token the round trips, statements executed
(extended-protocol ``Execute``), statements prepared (``Parse``) and simple queries (``BEGIN``,
``COMMIT``...), during the run and until the server is idle again (the ledger's sequencer
integrates after the requests were answered). The proxy costs CPU of its own on the same cores:
compare CPU figures only between runs made alike.

  python bench/hotpath.py --base ../hotpath-base --database-url postgresql://postgres@127.0.0.1:5432/test
  python bench/hotpath.py --base ../hotpath-base --stores sqlite --connections 1 8 32 64 --reps 1
  python bench/hotpath.py --base ../hotpath-base --stores postgresql --pg-count --reps 1

``--pg-roles``: PostgreSQL's CPU per token split by what each backend of the server's database
does, from the run's start until the server is idle again: ``writer`` (the group-commit writer's
statement: the ``jti`` claim, the decisions' inputs, the ledger's pending rows), ``sequencer`` (the
ledger's integration and its polls: pending rows moved into leaves, payloads and tree nodes, the
checkpoint),
``other`` (reads, surveillance, the cache's notifications). A backend's role is read off the statements
``pg_stat_activity`` shows it running, sampled every 50 ms during the run (the most frequent one
other than ``BEGIN``/``COMMIT``/``ROLLBACK``).

``--pg-stats``: per token, until the server is idle again, from the database's own counters (a
PostgreSQL cluster of one's own with ``shared_preload_libraries = pg_stat_statements``: the WAL
counters are the cluster's): statements executed and their execution time, rows, blocks dirtied
and written (``pg_stat_statements``, this database's entries), commits (``pg_stat_database``), WAL
records, full-page images and bytes (``pg_stat_wal``); and the statements that cost most, each with
the shared blocks it touched per call (hit or read: a plan that reads a whole table shows here).

``--ours-env`` / ``--base-env KEY=VALUE ...``: settings for one of the two servers only, e.g. a
setting A/B on one tree (``--base .`` and ``--ours-env TRUSTPLANE_AUDIT_PROOF_CACHE_MB=0``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pg_index_entries
from _cluster import tree
from _common import free_port, wait_ready
from _pgcount import CountingProxy
from token_endpoint import (
    BIN,
    RESOURCE,
    TICK,
    _create_pg_database,
    cli,
    make_bodies,
    process_tree_ticks,
    run_wrk,
    server_env,
    start,
    stop,
)

HERE = Path(__file__).resolve().parent
OURS = HERE.parent


@dataclass
class Target:
    """One running server: a tree on a store."""

    tree: str
    store: str
    env: dict[str, str]
    work: Path
    pg_name: str
    issuer: str = ""
    client_id: str = ""
    pem: bytes = b""
    proc: Any = None
    proxy: CountingProxy | None = None
    db_oid: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.env['TRUSTPLANE_OPS_PORT']}"


def setup(
    tree: str,
    src: Path,
    store: str,
    args: argparse.Namespace,
    root: Path,
    extra: dict[str, str] | None = None,
    first: Path | None = None,
) -> Target:
    """A server of ``tree`` (sources ``src``) on ``store``, started; ``extra``: more environment,
    ``first``: a directory put before ``src`` on its ``PYTHONPATH`` (a diagnostic probe)."""
    work = root / f"{tree}-{store}"
    work.mkdir()
    port = int(args.port_base) + len(list(root.iterdir()))
    env, pg_name = server_env(work, port, args.database_url if store == "postgresql" else "")
    env["PYTHONPATH"] = f"{first}{os.pathsep}{src}" if first else str(src)
    env.update(extra or {})
    target = Target(tree, store, env, work, pg_name, issuer=f"http://127.0.0.1:{port}")
    if pg_name and getattr(args, "pg_count", False):
        target.proxy = counted(env, pg_name)
    cli("migrate", env=env)
    if pg_name and getattr(args, "wal", False):
        target.db_oid = int(
            admin_query(
                env["TRUSTPLANE_DATABASE_URL"],
                "CREATE EXTENSION IF NOT EXISTS pg_walinspect; "
                "SELECT oid FROM pg_database WHERE datname = current_database()",
            )[0][0]
        )
    cli("clients", "keygen", "--out", str(work / "client"), "--kid", "bench-key", env=env)
    client = json.loads(
        cli(
            "clients", "add", "--lei", "5493001KJTIIGC8Y1R12", "--scope", "order:create",
            "--resource", RESOURCE, "--jwks-file", str(work / "client" / "jwks.json"),
            "--name", "bench", "--json", env=env,
        )
    )  # fmt: skip
    target.client_id, target.pem = client["client_id"], (work / "client" / "key.pem").read_bytes()
    target.proc = start(
        [str(BIN / "trustplane"), "serve", "--workers", str(args.workers)], env, work / "server.log"
    )
    try:
        wait_ready(f"{target.issuer}/healthz", timeout=240.0)
    except SystemExit:
        stop(target.proc)
        raise
    return target


def counted(env: dict[str, str], pg_name: str) -> CountingProxy:
    """Point the server at its database through a new counting proxy."""
    url = urlsplit(env["TRUSTPLANE_DATABASE_URL"])
    proxy = CountingProxy(url.hostname or "127.0.0.1", url.port or 5432, free_port()).start()
    user = f"{url.username}@" if url.username else ""
    netloc = f"{user}127.0.0.1:{proxy.listen_port}"
    env["TRUSTPLANE_DATABASE_URL"] = urlunsplit(url._replace(netloc=netloc))
    return proxy


def per_token(before: dict[str, int], after: dict[str, int], requests: float) -> dict[str, float]:
    return {k: (after[k] - before[k]) / max(requests, 1) for k in after}


def batch_histogram(target: Target) -> tuple[float, float]:
    """(sum, count) of the group-commit batch-size histogram, over all workers."""
    with urllib.request.urlopen(f"{target.ops}/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    total = re.search(r"^trustplane_group_commit_batch_size_sum (\S+)$", text, re.M)
    count = re.search(r"^trustplane_group_commit_batch_size_count (\S+)$", text, re.M)
    return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)


def admin_query(url: str, sql: str, *params: Any) -> list[Any]:
    """Rows of ``sql`` (its last statement if several, with no parameters then) on a new
    connection to ``url``, retried for a while if the server has no connection to give (other
    benches on the same server)."""

    async def query() -> list[Any]:
        import asyncpg  # type: ignore[import-untyped]

        for attempt in range(120):  # a minute: other helpers' servers can hold every slot that long
            try:
                conn = await asyncpg.connect(url)
                break
            except asyncpg.exceptions.TooManyConnectionsError:
                if attempt == 119:
                    raise
                await asyncio.sleep(0.5)
        try:
            if params or ";" not in sql:
                return list(await conn.fetch(sql, *params))
            *first, last = sql.split("; ")
            for statement in first:
                await conn.execute(statement)
            return list(await conn.fetch(last))
        finally:
            await conn.close()

    return asyncio.run(query())


def pg_backends(admin_url: str, name: str) -> list[int]:
    sql = "SELECT pid FROM pg_stat_activity WHERE datname = $1"
    return [int(r[0]) for r in admin_query(admin_url, sql, name)]


def wal_lsn(admin_url: str) -> str:
    return str(admin_query(admin_url, "SELECT pg_current_wal_lsn()::text")[0][0])


def wal_bytes(url: str, oid: int, start: str, end: str) -> tuple[int, int] | None:
    """(bytes, of which full-page images) of the WAL between ``start`` and ``end`` that touch the
    relations of the database ``oid`` (``pg_walinspect``, installed in the database of ``url``;
    other databases' WAL left out, and so are commit records, which name no relation). None if a
    checkpoint has recycled the segments since ``start`` (other tenants' WAL)."""
    import asyncpg

    try:
        row = admin_query(
            url,
            "SELECT coalesce(sum(record_length), 0), coalesce(sum(fpi_length), 0) "
            "FROM pg_get_wal_records_info($1::text::pg_lsn, $2::text::pg_lsn) "
            "WHERE block_ref LIKE $3",
            start,
            end,
            f"%rel %/{oid}/%",
        )[0]
    except asyncpg.exceptions.UndefinedFileError:
        return None
    return int(row[0]), int(row[1])


STATEMENTS_SQL = (
    "SELECT queryid::text, left(regexp_replace(query, '\\s+', ' ', 'g'), 160), calls, "
    "total_exec_time, rows, shared_blks_dirtied, shared_blks_written, wal_records, wal_bytes, "
    "shared_blks_hit + shared_blks_read "
    "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1"
)


def pg_stats(admin_url: str, name: str) -> dict[str, Any]:
    """This database's statement counters (by query id) and commits, the cluster's WAL counters."""
    rows = admin_query(admin_url, STATEMENTS_SQL, name)
    commits = admin_query(
        admin_url, "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", name
    )[0][0]
    wal = admin_query(admin_url, "SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal")[0]
    return {
        "statements": {r[0]: (r[1], *(float(x) for x in r[2:])) for r in rows},
        "commits": int(commits),
        "wal": tuple(int(x) for x in wal),
    }


STAT_COLUMNS = (
    "calls", "exec_ms", "rows", "dirtied", "written", "wal_records", "wal_bytes", "blocks"
)  # fmt: skip


def pg_stats_per_token(before: dict[str, Any], after: dict[str, Any], n: float) -> dict[str, Any]:
    """Per token: the totals, and each statement's calls, time and blocks (the costliest first)."""
    each = []
    for qid, (text, *values) in after["statements"].items():
        old = before["statements"].get(qid, (text, *([0.0] * len(values))))[1:]
        delta = [(a - b) / max(n, 1) for a, b in zip(values, old, strict=True)]
        if delta[0] > 0:
            each.append((text, dict(zip(STAT_COLUMNS, delta, strict=True))))
    each.sort(key=lambda e: -e[1]["exec_ms"])
    out: dict[str, Any] = {f"pgs_{c}": sum(e[1][c] for e in each) for c in STAT_COLUMNS}
    out["pgs_commits"] = (after["commits"] - before["commits"]) / max(n, 1)
    for i, key in enumerate(("records", "fpi", "bytes")):
        out[f"pgs_cluster_wal_{key}"] = (after["wal"][i] - before["wal"][i]) / max(n, 1)
    out["pgs_top"] = each[:12]
    return out


def ticks(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            out[pid] = int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return out


def tree_write_calls(root: int) -> int:
    """The ``write`` system calls of a process tree so far (``/proc/<pid>/io`` ``syscw``; uvloop
    writes sockets with ``write``: responses, and statements to PostgreSQL)."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/io") as handle:
                total += int(next(x for x in handle if x.startswith("syscw:")).split()[1])
        except (OSError, StopIteration):
            continue
    return total


def wait_idle(targets: list[Target], cap: float) -> None:
    """Until every server's process tree used under 5% of a core over half a second (at most
    ``cap`` seconds)."""
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        before = [process_tree_ticks(t.proc.pid) for t in targets]
        time.sleep(0.5)
        after = [process_tree_ticks(t.proc.pid) for t in targets]
        if all((a - b) / TICK < 0.025 for a, b in zip(after, before, strict=True)):
            return


#: (role, marks): a backend whose most frequent statement contains a mark has that role; the
#: sequencer's first (its move statement names ``audit_pending`` too).
ROLES = (
    (
        "sequencer",
        ("WITH r AS", "audit_leaves", "audit_tree", "audit_log_state", "audit_pending ORDER"),
    ),
    ("writer", ("used_jtis", "policy_decisions", "INSERT INTO audit_pending")),
)
IDLE_STATEMENTS = {"BEGIN", "BEGIN;", "COMMIT", "COMMIT;", "ROLLBACK", "ROLLBACK;", ";", ""}


class RoleSampler:
    """Samples ``pg_stat_activity`` for one database while a run goes on (``--pg-roles``): what
    statements each backend shows, to tell which part of the server it serves."""

    def __init__(self, admin_url: str, name: str) -> None:
        self.admin_url, self.name = admin_url, name
        self.seen: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RoleSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import asyncpg

        async def sample() -> None:
            conn = await asyncpg.connect(self.admin_url)
            try:
                while not self._stop.is_set():
                    rows = await conn.fetch(
                        "SELECT pid, left(query, 400) AS q FROM pg_stat_activity "
                        "WHERE datname = $1",
                        self.name,
                    )
                    for row in rows:
                        text = " ".join(str(row["q"]).split())
                        counts = self.seen.setdefault(int(row["pid"]), {})
                        counts[text] = counts.get(text, 0) + 1
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()

        asyncio.run(sample())

    def role(self, pid: int) -> str:
        counts = {q: n for q, n in self.seen.get(pid, {}).items() if q not in IDLE_STATEMENTS}
        if not counts:
            return "other"
        top = max(counts, key=lambda q: counts[q])
        return next((r for r, marks in ROLES if any(m in top for m in marks)), "other")


def measure(target: Target, connections: int, args: argparse.Namespace, rep: int) -> None:
    bodies = target.work / "run.bodies"
    n = max(2000, int(args.expect_rps * args.duration * 1.6))
    make_bodies(bodies, n, target.pem, target.client_id, target.issuer)
    pids = pg_backends(args.database_url, target.pg_name) if target.pg_name else []
    pg_before = ticks(pids)
    hist_before = batch_histogram(target)
    load = os.getloadavg()[0]
    counts_before = target.proxy.snapshot() if target.proxy else {}
    lsn_before = wal_lsn(args.database_url) if target.db_oid else ""
    writes_before = tree_write_calls(target.proc.pid)
    server_before = process_tree_ticks(target.proc.pid)
    sampler = RoleSampler(args.database_url, target.pg_name) if args.pg_roles else None
    stats_before = pg_stats(args.database_url, target.pg_name) if args.pg_stats else None
    with sampler or contextlib.nullcontext():
        result: dict[str, Any] = dict(
            run_wrk(f"{target.issuer}/token", bodies, connections, args.duration, target.proc.pid)
        )
    result["writes_per_req"] = (tree_write_calls(target.proc.pid) - writes_before) / max(
        result["requests"], 1
    )
    hist_after = batch_histogram(target)
    pg_after = ticks(pids)
    commits = hist_after[1] - hist_before[1]
    if target.proxy is not None:
        during = per_token(counts_before, target.proxy.snapshot(), result["requests"])
        wait_idle([target], args.idle_cap)
        until_idle = per_token(counts_before, target.proxy.snapshot(), result["requests"])
        result.update({f"pg_{k}": v for k, v in during.items()})
        # per commit of the writer: what a batch costs whatever its size (the sequencer's share too)
        result["pg_round_trips_per_commit"] = (
            during["round_trips"] * result["requests"] / max(commits, 1)
        )
        result.update({f"pg_{k}_until_idle": v for k, v in until_idle.items()})
    wait_idle([target], args.idle_cap)  # the sequencer integrates what the run appended
    pg_idle = ticks(pids)
    if sampler is not None:
        for role, _ in (*ROLES, ("other", ())):
            used = sum(
                pg_idle[p] - pg_before.get(p, pg_idle[p])
                for p in pg_idle
                if sampler.role(p) == role
            )
            result[f"pg_{role}_ms_per_req"] = 1000.0 * used / TICK / max(result["requests"], 1)
    server_idle = process_tree_ticks(target.proc.pid)
    if stats_before is not None:
        time.sleep(1.0)  # a backend reports its statistics at most once a second when idle
        after = pg_stats(args.database_url, target.pg_name)
        result.update(pg_stats_per_token(stats_before, after, result["requests"]))
    if target.db_oid:
        own = args.database_url.rsplit("/", 1)[0] + f"/{target.pg_name}"  # has pg_walinspect
        wal = wal_bytes(own, target.db_oid, lsn_before, wal_lsn(args.database_url))
        if wal is not None:
            result["wal_bytes_per_req"] = wal[0] / max(result["requests"], 1)
            result["wal_fpi_bytes_per_req"] = wal[1] / max(result["requests"], 1)
    bodies.unlink()
    result.update(
        cpu_ms_per_req_until_idle=1000.0
        * (server_idle - server_before)
        / TICK
        / max(result["requests"], 1),
        pg_cpu_ms_per_req_until_idle=1000.0
        * sum(pg_idle[p] - pg_before.get(p, pg_idle[p]) for p in pg_idle)
        / TICK
        / max(result["requests"], 1),
        tree=target.tree,
        store=target.store,
        connections=connections,
        rep=rep,
        load1=load,
        commits=commits,
        requests_per_commit=(hist_after[0] - hist_before[0]) / commits if commits else 0.0,
        pg_cpu_ms_per_req=1000.0
        * sum(pg_after[p] - pg_before.get(p, pg_after[p]) for p in pg_after)
        / TICK
        / max(result["requests"], 1),
    )
    target.runs.append(result)
    print(
        f"  {target.store:<10} {target.tree:<4} c={connections:<3} rep {rep}: "
        f"{result['rps']:7.0f}/s  p50 {result['p50_ms']:6.1f}  p99 {result['p99_ms']:6.1f} ms  "
        f"cpu {result['cpu_ms_per_req']:.3f}  pg {result['pg_cpu_ms_per_req']:.3f} ms/tok  "
        f"req/commit {result['requests_per_commit']:5.1f}  writes {result['writes_per_req']:.2f}  "
        f"until idle: cpu {result['cpu_ms_per_req_until_idle']:.3f} "
        f"pg {result['pg_cpu_ms_per_req_until_idle']:.3f}  "
        + (
            f"wal {result['wal_bytes_per_req']:.0f} B/tok  "
            if "wal_bytes_per_req" in result
            else ""
        )
        + f"non-2xx {result['non_2xx']:.0f}  "
        f"load {load:.2f}",
        flush=True,
    )
    if sampler is not None:
        print("    PostgreSQL ms per token until idle: " + "  ".join(
            f"{role} {result[f'pg_{role}_ms_per_req']:.3f}" for role in ("writer", "sequencer", "other")
        ), flush=True)  # fmt: skip
    if stats_before is not None:
        print("    per token until idle: " + "  ".join(
            f"{k[4:]} {result[k]:.3f}" for k in result if k.startswith("pgs_") and k != "pgs_top"
        ), flush=True)  # fmt: skip
        for text, cols in result["pgs_top"]:
            print(f"      {cols['calls']:.3f} calls {cols['exec_ms'] * 1000:7.1f} us "
                  f"rows {cols['rows']:.2f} dirtied {cols['dirtied']:.3f} "
                  f"wal {cols['wal_bytes']:6.0f} B blocks/call "
                  f"{cols['blocks'] / max(cols['calls'], 1e-9):7.1f}  {text[:110]}", flush=True)  # fmt: skip
    if target.proxy is not None:
        print("    per token, in the run / until idle: " + "  ".join(
            f"{k} {result[f'pg_{k}']:.2f}/{result[f'pg_{k}_until_idle']:.2f}"
            for k in ("round_trips", "execute", "parse", "query", "bytes_up", "bytes_down")
        ) + f"  round trips per commit {result['pg_round_trips_per_commit']:.1f}", flush=True)  # fmt: skip
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps(result) + "\n")


def summarise(targets: list[Target]) -> None:
    keys = ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req", "pg_cpu_ms_per_req")
    keys += ("requests_per_commit", "writes_per_req", "load1")
    keys += ("cpu_ms_per_req_until_idle", "pg_cpu_ms_per_req_until_idle")
    statements = ("pg_round_trips", "pg_execute", "pg_parse", "pg_query")
    statements += ("pg_round_trips_per_commit",)
    print("\nmedians: store tree c | tokens/s p50 p99 | cpu/tok pg/tok | req/commit writes/tok | "
          "load1 | n")  # fmt: skip
    for target in targets:
        for c in sorted({r["connections"] for r in target.runs}):
            runs = [r for r in target.runs if r["connections"] == c]
            m = {k: statistics.median(r[k] for r in runs) for k in keys}
            print(
                f"{target.store:<10} {target.tree:<4} c={c:<3} | {m['rps']:6.0f} "
                f"{m['p50_ms']:6.1f} {m['p99_ms']:6.1f} | {m['cpu_ms_per_req']:.3f} "
                f"{m['pg_cpu_ms_per_req']:.3f} | {m['requests_per_commit']:5.1f} "
                f"{m['writes_per_req']:.2f} | "
                f"{m['load1']:.2f} | {len(runs)}  (non-2xx {sum(r['non_2xx'] for r in runs):.0f})"
            )
            idle_total = m["cpu_ms_per_req_until_idle"] + m["pg_cpu_ms_per_req_until_idle"]
            wal = [
                r["wal_bytes_per_req"] - r["wal_fpi_bytes_per_req"]
                for r in runs
                if "wal_bytes_per_req" in r
            ]
            print(
                f"    until idle: cpu/tok {m['cpu_ms_per_req_until_idle']:.3f} "
                f"pg/tok {m['pg_cpu_ms_per_req_until_idle']:.3f} sum {idle_total:.3f}"
                + (
                    f"  WAL without full-page images {statistics.median(wal):.0f} B/tok"
                    if wal
                    else ""
                )
            )
            if "pg_writer_ms_per_req" in runs[0]:
                print("    PostgreSQL ms per token until idle: " + "  ".join(
                    f"{role} {statistics.median(r[f'pg_{role}_ms_per_req'] for r in runs):.3f}"
                    for role in ("writer", "sequencer", "other")
                ))  # fmt: skip
            if "pgs_calls" in runs[0]:
                print("    per token (until idle): " + "  ".join(
                    f"{k[4:]} {statistics.median(r[k] for r in runs):.3f}"
                    for k in runs[0] if k.startswith("pgs_") and k != "pgs_top"
                ))  # fmt: skip
            if target.proxy is not None:
                print("    per token (until idle): " + "  ".join(
                    f"{k[3:]} {statistics.median(r.get(k + '_until_idle', r[k]) for r in runs):.2f}"
                    for k in statements
                ))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", type=Path, required=True, help="the baseline tree (has src/)")
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--stores", nargs="+", default=["sqlite", "postgresql"])
    ap.add_argument("--connections", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--expect-rps", type=float, default=3500, help="sizes the pre-made bodies")
    ap.add_argument("--idle-cap", type=float, default=20.0)
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("BENCH_PORT", "26100")))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--pg-count", action="store_true", help="count PostgreSQL round trips")
    ap.add_argument(
        "--wal", action="store_true", help="WAL bytes per token (pg_walinspect), index entries"
    )
    ap.add_argument(
        "--pg-roles", action="store_true", help="PostgreSQL CPU per token by backend role"
    )
    ap.add_argument(
        "--pg-stats", action="store_true", help="pg_stat_statements / pg_stat_wal per token"
    )
    ap.add_argument("--ours-env", nargs="*", default=[], help="KEY=VALUE for this tree's server")
    ap.add_argument("--base-env", nargs="*", default=[], help="KEY=VALUE for the base's server")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required (apt-get install wrk)")
    trees = {"ours": OURS / "src", "base": args.base.resolve() / "src"}
    root = Path(tempfile.mkdtemp(prefix="tp-hotpath-"))
    every: list[Target] = []
    try:
        for store in args.stores:
            envs = {"ours": args.ours_env, "base": args.base_env}
            targets = [
                setup(t, src, store, args, root, extra=dict(kv.split("=", 1) for kv in envs[t]))
                for t, src in trees.items()
            ]
            every += targets
            for target in targets:  # warm-up, discarded
                w = target.work / "warm.bodies"
                make_bodies(w, int(args.expect_rps * args.warmup * 1.6), target.pem,
                            target.client_id, target.issuer)  # fmt: skip
                run_wrk(f"{target.issuer}/token", w, max(args.connections), args.warmup,
                        target.proc.pid)  # fmt: skip
                w.unlink()
            print(f"{store}: {args.workers} workers, {args.duration}s runs", flush=True)
            for rep in range(1, args.reps + 1):
                for c in args.connections:
                    order = targets if (rep + c) % 2 else targets[::-1]
                    for target in order:
                        wait_idle(targets, args.idle_cap)
                        measure(target, c, args, rep)
            for target in targets:
                stop(target.proc)
                target.proc = None
        summarise(every)
    finally:
        for target in every:
            if target.proc is not None:
                stop(target.proc)
            if target.proxy is not None:
                target.proxy.stop()
            if target.pg_name and target.db_oid:
                print(f"\nindex entries, {target.tree}:", flush=True)
                url = args.database_url.rsplit("/", 1)[0] + f"/{target.pg_name}"
                asyncio.run(pg_index_entries.main(url))
            if target.pg_name:
                asyncio.run(_create_pg_database(args.database_url, target.pg_name, drop=True))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
