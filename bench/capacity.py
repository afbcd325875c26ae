#!/usr/bin/env python3
"""Measured inputs of the capacity model in docs/scaling.md (issue 15 item 5).

``costs``: one ``trustplane serve`` on PostgreSQL (+ Redis, NATS) reached through a counting proxy
(bench/_pgcount.py: every frontend Sync or simple Query is one round trip), driven by wrk for each
operation: client_credentials token, RFC 8693 token exchange, AuthZEN evaluation. Per operation:
server CPU, PostgreSQL backend CPU, round trips, bytes each way, commits, rows inserted, and the
growth of every table (pg_total_relation_size) once the ledger has integrated everything.

``sequencer``: the ledger's integrator alone (``Ledger.integrate``, the code the background loop
runs) on pre-filled pending entries: entries/s and CPU per entry (this process + PostgreSQL
backend) at a few batch sizes, and the fit t(b) = fixed + b * per_entry of one integration.

``backlog``: the scaled-down verification. The integrator runs continuously with its batch cut to
``--batch`` entries, so the model predicts its ceiling C = b / t(b), t(b) measured just before at
that b; a producer process appends at 0.5 C and then at 2 C. The model says the pending backlog stays
flat in the first phase and grows at (rate - C)/s in the second: both are printed beside the
measured slope.

``model``: the market-wide figures (docs/scaling.md) from what ``costs`` and ``sequencer`` wrote
with ``--json``: each measured cost per token times the peak rate (cores at a target utilisation),
the ledger's entries/s against the sequencer's ceiling, storage over the years kept.

  python bench/capacity.py costs
  python bench/capacity.py sequencer --entries 100000
  python bench/capacity.py backlog --batch 16
  python bench/capacity.py model --json results.jsonl   # the market-wide table from costs + sequencer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import _cluster as cl
import token_endpoint as te
from _pgcount import CountingProxy

HERE = Path(__file__).resolve().parent
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
#: PostgreSQL 15 backends flush their statistics up to 10 s after going idle
STATS_FLUSH = 11.0
LEDGER_TABLES = ("audit_leaves", "audit_tree", "audit_payloads", "audit_checkpoints")


# --------------------------------------------------------------------------- costs


def _wrk(url: str, script: str, connections: int, seconds: int, *extra: str) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s",
         str(HERE / script), url, "--", *extra],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    if "wrapped" in out.stderr:
        raise SystemExit("wrk ran out of pre-generated bodies")
    import re

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    return {
        "requests": float(re.search(r"(\d+) requests in", out.stdout).group(1)),  # type: ignore[union-attr]
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1)),  # type: ignore[union-attr]
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def _snapshot(cluster: cl.Cluster, proxy: CountingProxy) -> dict[str, Any]:
    inst = [p for pids in cluster.instance_pids() for p in pids]
    return {
        "server": cl.ticks(inst),
        "pg": cl.ticks(cl.pg_backends(cluster.db)),
        "redis": cl.ticks(cl.pids_named("redis-server")),
        "round_trips": proxy.round_trips,
        "to_pg": proxy.bytes_up,
        "from_pg": proxy.bytes_down,
        "leaves": int(cl.psql(cluster.db, "SELECT count(*) FROM audit_leaves")),
        # cluster-wide: includes whatever the others wrote meanwhile (an upper bound)
        "wal": int(float(cl.psql(cluster.db, "SELECT pg_current_wal_lsn() - '0/0'"))),
        **cl.pg_counters(cluster.db),
    }


def _settle(cluster: cl.Cluster) -> None:
    """Wait until the instance's own sequencer has integrated everything pending."""
    for _ in range(100):
        if cl.psql(cluster.db, "SELECT count(*) FROM audit_pending") == "0":
            return
        time.sleep(0.2)
    raise SystemExit("pending entries were not integrated within 20 s")


def measure_op(
    cluster: cl.Cluster, proxy: CountingProxy, name: str, prepare: Any, seconds: int
) -> dict[str, Any]:
    """``prepare(seconds)`` makes the requests (minting what they need) and returns the callable
    that sends them: only the sending is inside the measurement."""
    prepare(2)()  # warm-up
    send = prepare(seconds)
    _settle(cluster)
    cl.psql(cluster.db, "VACUUM")
    time.sleep(STATS_FLUSH)
    sizes0, s0 = cl.relation_sizes(cluster.db), _snapshot(cluster, proxy)
    result = send()
    _settle(cluster)
    time.sleep(STATS_FLUSH)
    s1 = _snapshot(cluster, proxy)
    cl.psql(cluster.db, "VACUUM")
    sizes1 = cl.relation_sizes(cluster.db)
    n = result["requests"]
    d = {k: s1[k] - s0[k] for k in s0}
    growth = {t: (sizes1.get(t, 0) - sizes0.get(t, 0)) / n for t in sizes1}
    row = {
        "op": name,
        "ops": n,
        "rps": result["rps"],
        "non_2xx": result["non_2xx"],
        "server_cpu_ms": 1000 * d["server"] / cl.TICK / n,
        "pg_cpu_ms": 1000 * d["pg"] / cl.TICK / n,
        "redis_cpu_ms": 1000 * d["redis"] / cl.TICK / n,
        "round_trips": d["round_trips"] / n,
        "bytes_to_pg": d["to_pg"] / n,
        "bytes_from_pg": d["from_pg"] / n,
        "commits": d["xact_commit"] / n,
        "rows_inserted": d["tup_inserted"] / n,
        "ledger_entries": d["leaves"] / n,
        "db_bytes": sum(growth.values()),
        "wal_bytes_upper_bound": d["wal"] / n,
        "ledger_bytes_per_entry": sum(growth.get(t, 0) for t in LEDGER_TABLES)
        * n
        / max(1, d["leaves"]),
        "growth_by_table": {t: round(b, 1) for t, b in sorted(growth.items()) if abs(b) >= 1},
        "load": cl.loadavg(),
    }
    print(json.dumps(row), flush=True)
    return row


def costs(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="tp-costs-"))
    proxy = CountingProxy(cl.PG_HOST, cl.PG_PORT, args.port_base + 50).start()
    db = f"capacity_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://{cl.PG_USER}@127.0.0.1:{args.port_base + 50}/{db}"
    cluster = cl.Cluster(1, work, args.port_base, haproxy=False, database_url=url, db=db)
    rows, idle = [], 0.0
    try:
        cluster.start()
        token_url = f"{cluster.issuer}/token"

        def tokens(seconds: int) -> Any:
            bodies = work / "cc.bodies"
            te.make_bodies(
                bodies, 2500 * seconds + 1000, cluster.pem, cluster.client_id, cluster.issuer
            )
            return lambda: _wrk(token_url, "once.lua", args.connections, seconds, str(bodies))

        def exchanges(seconds: int) -> Any:
            import token_exchange as tx

            bodies = work / "tx.bodies"
            ctx = {"client_id": cluster.client_id, "issuer": cluster.issuer, "secrets": cluster.pem}
            tx.write_bodies(bodies, 2500 * seconds + 1000, EXCHANGE, ctx)
            return lambda: _wrk(token_url, "once.lua", args.connections, seconds, str(bodies))

        def decisions(seconds: int) -> Any:
            import pdp_http

            token = pdp_http._access_token(
                cluster.issuer, cluster.client_id, cluster.pem, "bench-key"
            )
            body = work / "evaluation.json"
            body.write_text(json.dumps(pdp_http._evaluation_json()))
            url = f"{cluster.issuer}/access/v1/evaluation"
            return lambda: _wrk(url, "authzen.lua", args.connections, seconds, str(body), token)

        # the background loops (sequencer poll, cache refresh, health) cost CPU with no load at all
        inst = [p for pids in cluster.instance_pids() for p in pids]
        idle0 = cl.ticks(inst)
        time.sleep(10)
        idle = (cl.ticks(inst) - idle0) / cl.TICK / 10
        print(f"idle instance: {idle:.3f} cores", flush=True)
        for name, run in (("token", tokens), ("exchange", exchanges), ("decision", decisions)):
            rows.append(measure_op(cluster, proxy, name, run, args.seconds))
    finally:
        cluster.stop()
        proxy.stop()
    print(
        "\n| operation | ops/s | server CPU ms | PG CPU ms | round trips | bytes to/from PG "
        "| commits | rows inserted | ledger entries | DB bytes | bytes per ledger entry |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['rps']:.0f} | {r['server_cpu_ms']:.2f} | {r['pg_cpu_ms']:.2f} | "
              f"{r['round_trips']:.2f} | {r['bytes_to_pg']:.0f} / {r['bytes_from_pg']:.0f} | "
              f"{r['commits']:.3f} | {r['rows_inserted']:.2f} | {r['ledger_entries']:.2f} | "
              f"{r['db_bytes']:.0f} | {r['ledger_bytes_per_entry']:.0f} |")  # fmt: skip
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps({"mode": "costs", "rows": rows, "idle_cores": idle}) + "\n")


# --------------------------------------------------------------------------- the sequencer


def _event(n: int) -> Any:
    from trustplane.audit_events import AuditEvent, AuditEventType

    return AuditEvent(
        type=AuditEventType.TOKEN_ISSUED,
        issuer="https://as.northwind.example",
        subject=f"client-{n % 997}",
        client_id=f"client-{n % 997}",
        audience="https://execution.example/api",
        scopes=("order:create",),
        jti=secrets.token_urlsafe(16),
        transaction_id=f"txn-{n // 8}",
        decision="allow",
        payload={"grant_type": "client_credentials", "exp": 1_900_000_000 + n},
    )


async def _ledger(db_name: str, batch: int) -> tuple[Any, Any]:
    from trustplane.audit.ledger import Ledger
    from trustplane.keys.crypto import new_kek_text
    from trustplane.settings import Settings, decode_kek
    from trustplane.storage.db import Database
    from trustplane.storage.migrate import upgrade

    url = f"postgresql+asyncpg://{cl.PG_USER}@{cl.PG_HOST}:{cl.PG_PORT}/{db_name}"
    kek = new_kek_text()
    settings = Settings(issuer="https://as.northwind.example", database_url=url,
                        data_dir=Path(tempfile.mkdtemp()), key_encryption_key=kek,
                        log_level="error", audit_integrate_batch=batch)  # fmt: skip
    db = Database(url)
    await upgrade(db)
    ledger = Ledger(settings, db, decode_kek(kek))
    await ledger.start()
    return db, ledger


async def _fill(db: Any, n: int) -> None:
    from trustplane.audit.sink import pending_row
    from trustplane.audit.store import append_pending

    for first in range(0, n, 5000):
        rows = [pending_row(_event(i)) for i in range(first, min(n, first + 5000))]
        async with db.transaction() as conn:
            await append_pending(conn, rows)


async def _sequencer(args: argparse.Namespace, db_name: str) -> dict[str, Any]:
    db, ledger = await _ledger(db_name, 2048)
    fit: list[tuple[int, float]] = []
    try:
        for batch in args.batches:
            await _fill(db, args.entries)
            cl.psql(db_name, "VACUUM ANALYZE audit_pending")
            pg = cl.pg_backends(db_name)
            pg0, own0, t0 = cl.ticks(pg), os.times(), time.perf_counter()
            done, rounds = 0, []
            while (step := await ledger.integrate(batch)) is not None:
                done += step.count
                rounds.append((step.count, step.seconds))
            wall, own1 = time.perf_counter() - t0, os.times()
            pg_cpu = (cl.ticks(pg) - pg0) / cl.TICK
            own = own1.user + own1.system - own0.user - own0.system
            full = [s for c, s in rounds if c == batch]
            per_round = sorted(full)[len(full) // 2] if full else wall / max(1, len(rounds))
            fit.append((batch, per_round))
            print(f"  batch {batch:>5}: {done / wall:8,.0f} entries/s  {len(rounds)} integrations, "
                  f"median {per_round * 1000:.1f} ms each; CPU per entry: integrator "
                  f"{1e6 * own / done:.0f} us + PostgreSQL {1e6 * pg_cpu / done:.0f} us; "
                  f"load {cl.loadavg()}", flush=True)  # fmt: skip
    finally:
        await db.dispose()
    # least squares t(b) = fixed + b * per_entry over the batch sizes
    xs, ys = [b for b, _ in fit], [t for _, t in fit]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in fit) / max(1e-12, sum((x - mx) ** 2 for x in xs))
    fixed = my - slope * mx
    print(f"  fit: one integration of b entries = {fixed * 1000:.2f} ms + b x {slope * 1e6:.1f} us "
          f"-> ceiling {1 / slope:,.0f} entries/s for large batches")  # fmt: skip
    return {"fixed_s": fixed, "per_entry_s": slope, "points": fit}


def sequencer(args: argparse.Namespace) -> dict[str, Any]:
    db_name = f"capacity_{uuid.uuid4().hex[:8]}"
    cl.psql("postgres", f'CREATE DATABASE "{db_name}"')
    try:
        print(
            f"sequencer alone, {args.entries:,} pending entries per batch size, load {cl.loadavg()}"
        )
        result = asyncio.run(_sequencer(args, db_name))
    finally:
        cl.psql("postgres", f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps({"mode": "sequencer", **result}) + "\n")
    return result


# --------------------------------------------------------------------------- backlog


def _producer(db_name: str, rate: float, seconds: float, counter: Any) -> None:
    """Append ``rate`` entries/s for ``seconds`` (every 20 ms, one transaction per tick)."""

    async def run() -> None:
        from trustplane.audit.sink import pending_row
        from trustplane.audit.store import append_pending
        from trustplane.storage.db import Database

        db = Database(f"postgresql+asyncpg://{cl.PG_USER}@{cl.PG_HOST}:{cl.PG_PORT}/{db_name}")
        rows = [pending_row(_event(i)) for i in range(int(rate * seconds) + 1)]
        start, sent = time.monotonic(), 0
        while sent < len(rows) - 1:
            due = min(len(rows) - 1, int((time.monotonic() - start) * rate))
            if due > sent:
                async with db.transaction() as conn:
                    await append_pending(conn, rows[sent:due])
                sent = due
                counter.value = sent
            await asyncio.sleep(0.02)
        await db.dispose()

    asyncio.run(run())


async def _backlog(args: argparse.Namespace, db_name: str, fit: dict[str, Any]) -> list[str]:
    db, ledger = await _ledger(db_name, args.batch)
    # the model at this batch size: one integration of b entries takes t(b), measured just before
    # at this very b (the straight-line fit is for large batches, where the fixed part is noise)
    ceiling = args.batch / dict(fit["points"])[args.batch]
    print(f"integrator limited to {args.batch} entries per integration: model ceiling "
          f"{ceiling:,.0f} entries/s (= {args.batch} / t({args.batch}))")  # fmt: skip
    lines = []
    try:
        for factor in args.factors:
            rate = factor * ceiling
            spawn = mp.get_context("spawn")  # not fork: this process runs an event loop
            counter = spawn.Value("q", 0)
            producer = spawn.Process(target=_producer, args=(db_name, rate, args.phase, counter))
            producer.start()
            while counter.value == 0 and producer.is_alive():  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.01)
            t0, integrated, trace = time.monotonic(), 0, []
            while producer.is_alive():
                step = await ledger.integrate(args.batch)
                integrated += step.count if step else 0
                if step is None:
                    await asyncio.sleep(0.005)
                now = time.monotonic() - t0
                if not trace or now - trace[-1][0] >= 0.5:
                    async with db.read() as conn:
                        found = await conn.exec_driver_sql("SELECT count(*) FROM audit_pending")
                        trace.append((now, int(found.scalar() or 0)))
            producer.join()
            half = [p for p in trace if p[0] >= trace[-1][0] / 2]  # the second half: past the start
            slope = (half[-1][1] - half[0][1]) / max(1e-9, half[-1][0] - half[0][0])
            predicted = max(0.0, rate - ceiling)
            line = (f"producer at {factor:.2f} x ceiling ({rate:,.0f}/s): integrated "
                    f"{integrated / trace[-1][0]:,.0f}/s, backlog slope {slope:+,.0f}/s (model "
                    f"{predicted:+,.0f}/s), backlog at the end {trace[-1][1]:,}; load {cl.loadavg()}")  # fmt: skip
            print("  " + line, flush=True)
            lines.append(line)
            await ledger.integrate_all()
    finally:
        await db.dispose()
    return lines


def backlog(args: argparse.Namespace) -> None:
    fit = sequencer(
        argparse.Namespace(
            **{**vars(args), "json": None, "batches": [args.batch, args.batch * 8, args.batch * 64]}
        )
    )
    db_name = f"capacity_{uuid.uuid4().hex[:8]}"
    cl.psql("postgres", f'CREATE DATABASE "{db_name}"')
    try:
        lines = asyncio.run(_backlog(args, db_name, fit))
    finally:
        cl.psql("postgres", f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps({"mode": "backlog", "lines": lines}) + "\n")


# --------------------------------------------------------------------------- the model


def model(args: argparse.Namespace) -> None:
    """The market-wide arithmetic of docs/scaling.md from the JSON lines ``costs`` and
    ``sequencer`` wrote (``--json``): every figure is a measured cost times the load."""
    found: dict[str, Any] = {}
    for line in args.json.read_text().splitlines():
        record = json.loads(line)
        found[record["mode"]] = record
    token = next(r for r in found["costs"]["rows"] if r["op"] == "token")
    seq = found["sequencer"]
    peak, u = args.peak, args.utilisation
    mean = peak / args.peak_to_mean
    tokens = mean * 86_400 * 365.25 * args.years
    entries = token["ledger_entries"]
    ceiling = 1 / seq["per_entry_s"]
    growth = token["growth_by_table"]
    ledger_bytes = sum(growth.get(t, 0) for t in LEDGER_TABLES)
    payload_bytes = growth.get("audit_payloads", 0)

    def out(what: str, measured: str, figure: str) -> None:
        print(f"| {what} | {measured} | {figure} |")

    print(f"peak {peak:,.0f} tokens/s, mean {mean:,.0f}/s (peak/{args.peak_to_mean:g}), "
          f"{args.years:g} years = {tokens:.3g} tokens; cores sized for {u:.0%} at peak\n")  # fmt: skip
    print("| quantity | measured per token | market-wide |\n|---|---|---|")
    out(
        "trustplane CPU",
        f"{token['server_cpu_ms']:.2f} ms",
        f"{peak * token['server_cpu_ms'] / 1000 / u:,.0f} cores (one process each)",
    )
    out(
        "PostgreSQL CPU",
        f"{token['pg_cpu_ms']:.2f} ms",
        f"{peak * token['pg_cpu_ms'] / 1000 / u:,.0f} cores",
    )
    out(
        "Redis CPU (jti claim)",
        f"{token['redis_cpu_ms']:.3f} ms",
        f"{peak * token['redis_cpu_ms'] / 1000 / u:,.1f} cores",
    )
    out(
        "round trips to PostgreSQL",
        f"{token['round_trips']:.2f}",
        f"{peak * token['round_trips']:,.0f}/s",
    )
    out("commits", f"{token['commits']:.3f}", f"{peak * token['commits']:,.0f}/s")
    out(
        "bytes to / from PostgreSQL",
        f"{token['bytes_to_pg']:,.0f} / {token['bytes_from_pg']:,.0f}",
        f"{peak * token['bytes_to_pg'] * 8 / 1e9:,.2f} / {peak * token['bytes_from_pg'] * 8 / 1e9:,.2f} Gbit/s",
    )
    out(
        "WAL (upper bound)",
        f"{token['wal_bytes_upper_bound']:,.0f} B",
        f"{peak * token['wal_bytes_upper_bound'] / 1e6:,.0f} MB/s",
    )
    out("ledger entries", f"{entries:.2f}", f"{peak * entries:,.0f}/s at peak")
    out(
        "single sequencer",
        f"ceiling {ceiling:,.0f} entries/s",
        f"{peak * entries / ceiling:.1f} x its ceiling: at least "
        f"{math.ceil(peak * entries / (u * ceiling))} logs at {u:.0%}",
    )
    out(
        "ledger storage",
        f"{ledger_bytes:,.0f} B ({ledger_bytes / max(entries, 1e-9):,.0f} B per entry)",
        f"{tokens * ledger_bytes / 1e15:,.2f} PB over {args.years:g} years "
        f"({tokens * (ledger_bytes - payload_bytes) / 1e15:,.2f} PB once payloads are purged)",
    )
    day = mean * 86_400
    out(
        "ledger growth per day at the mean rate",
        f"{ledger_bytes:,.0f} B",
        f"{day * ledger_bytes / 1e12:,.1f} TB/day: one log per day needs "
        f"{math.ceil(peak * entries / (u * ceiling))} partitions at peak",
    )
    if args.export_bytes:
        out(
            "archived export (JSONL, gzip)",
            f"{args.export_bytes:,.0f} B per entry",
            f"{tokens * entries * args.export_bytes / 1e15:,.2f} PB of object storage over "
            f"{args.years:g} years",
        )
    decisions = growth.get("policy_decisions", 0)
    out(
        f"policy_decisions (kept {args.decision_days} days)",
        f"{decisions:,.0f} B",
        f"{day * args.decision_days * decisions / 1e12:,.1f} TB",
    )
    redis_cores = peak * token["redis_cpu_ms"] / 1000 / u
    out("Redis shards (single-threaded)", "", f"{math.ceil(redis_cores)} at {u:.0%}")


def main() -> None:
    from trustplane.logging import configure_logging

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("mode", choices=("costs", "sequencer", "backlog", "model"))
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument(
        "--batches", type=lambda s: [int(x) for x in s.split(",")], default=[256, 2048, 8192]
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--factors", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 2.0]
    )
    ap.add_argument("--phase", type=float, default=15.0, help="seconds per producer rate")
    ap.add_argument("--port-base", type=int, default=27100)
    ap.add_argument("--json", type=Path, help="append results here (model: read them from here)")
    ap.add_argument("--peak", type=float, default=50_000.0, help="model: tokens/s at peak")
    ap.add_argument(
        "--peak-to-mean",
        type=float,
        default=8.7,
        help="model: peak / mean rate (40%% of peak for 10 h on 252 days a year: 8.7)",
    )
    ap.add_argument("--decision-days", type=int, default=90, help="model: policy_decisions kept")
    ap.add_argument("--export-bytes", type=float, default=0.0, help="model: archived B per entry")
    ap.add_argument("--years", type=float, default=7.0, help="model: evidence kept")
    ap.add_argument("--utilisation", type=float, default=0.7, help="model: target at peak")
    args = ap.parse_args()
    configure_logging("error", "console")
    modes = {"costs": costs, "sequencer": sequencer, "backlog": backlog, "model": model}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
