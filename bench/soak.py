#!/usr/bin/env python3
"""Bounded soak (issue 15 item 4) and the instance-count benchmark, on loopback only.

Soak (default): three ``trustplane serve`` instances behind HAProxy (``deploy/haproxy/haproxy.cfg``)
on one fresh PostgreSQL database plus Redis (jti replay cache) and NATS (security events).
1. Capacity: a short closed-loop ramp with wrk (``once.lua``: every client assertion sent once) at a
   few connection counts; capacity = the best token rate with no non-2xx answer.
2. Hold ``--fraction`` (0.7) of it for ``--minutes`` (10) with an open-loop, fixed-arrival-rate load
   (bench/_openloop.py), sampling every instance's RSS every ``--sample`` seconds.
3. Report: requests, errors (must be 0), p50/p99 per minute, RSS start (end of the first minute, the
   warm-up) / end / max per instance and its growth against ``--rss-bound`` (10 %), the load average,
   then integrate what is pending and run ``trustplane audit export`` + ``audit verify`` on the whole
   ledger, and check it holds one ``oauth:token:issued`` leaf per token answered.
Exit status 1 if any of those fails.

Instances (``--mode instances``): capacity of 1, 2 and 3 instances behind HAProxy, with tokens per
CPU-second of each component (instances, PostgreSQL backends, HAProxy, wrk) and the prediction of the
capacity model (docs/scaling.md): min(n cores' worth of the instances' own CPU per token, the CPU the
machine has left after everyone else's load / the whole path's CPU per token), with the per-token
costs measured in the one-instance run.

  python bench/soak.py                          # 10-minute soak
  python bench/soak.py --minutes 1              # a short one
  python bench/soak.py --mode instances
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cluster as cl
import token_endpoint as te
from _openloop import OpenLoop

CORES = os.cpu_count() or 1


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def closed_loop(cluster: cl.Cluster, connections: int, seconds: int, work: Path) -> dict[str, Any]:
    """wrk through the front door for ``seconds``; the rate and every component's CPU meanwhile."""
    bodies = work / f"ramp-{connections}.bodies"
    te.make_bodies(bodies, 2500 * seconds + 2000, cluster.pem, cluster.client_id, cluster.issuer)
    inst = [pid for pids in cluster.instance_pids() for pid in pids]
    pg = cl.pg_backends(cluster.db)
    proxy = cl.tree(cluster.proxy.pid) if cluster.proxy else []
    redis = cl.pids_named("redis-server")  # shared with the others, but busy with us in this run
    before = [cl.ticks(inst), cl.ticks(pg), cl.ticks(proxy), cl.ticks(redis), *cl.machine_ticks()]
    own0, t0 = os.times(), time.monotonic()
    result = te.run_wrk(f"{cluster.issuer}/token", bodies, connections, seconds, os.getpid())
    own1, wall = os.times(), time.monotonic() - t0  # wall > seconds: wrk loads the bodies first
    after = [cl.ticks(inst), cl.ticks(pg), cl.ticks(proxy), cl.ticks(redis), *cl.machine_ticks()]
    bodies.unlink()
    d = [(a - b) / cl.TICK for a, b in zip(after, before, strict=True)]
    wrk_cpu = (own1.children_user + own1.children_system) - (
        own0.children_user + own0.children_system
    )
    machine_busy = d[4]
    n = result["requests"]
    ours = d[0] + d[1] + d[2] + d[3] + wrk_cpu
    return {
        "connections": connections,
        "rps": result["rps"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "non_2xx": result["non_2xx"],
        "requests": n,
        "seconds": seconds,
        "cpu_ms_per_token": {
            "instances": 1000 * d[0] / n,
            "postgresql": 1000 * d[1] / n,
            "haproxy": 1000 * d[2] / n,
            "redis": 1000 * d[3] / n,
            "wrk": 1000 * wrk_cpu / n,
        },
        # CPU-seconds per second used by processes not ours (other engineers, Redis, NATS, PG's
        # own background processes) during the run
        "others_cores": max(0.0, (machine_busy - ours) / wall),
        "load": cl.loadavg(),
    }


def measure_capacity(
    cluster: cl.Cluster, steps: list[int], seconds: int, work: Path
) -> tuple[float, list[dict[str, Any]]]:
    closed_loop(cluster, steps[0], 3, work)  # warm-up, discarded
    runs = []
    for connections in steps:
        run = closed_loop(cluster, connections, seconds, work)
        runs.append(run)
        print(
            f"  ramp: {connections:>3} connections  {run['rps']:7.0f} tokens/s  "
            f"p50 {run['p50_ms']:6.1f} ms  p99 {run['p99_ms']:7.1f} ms  non-2xx {run['non_2xx']:.0f}  "
            f"load {run['load']}",
            flush=True,
        )
    clean = [r["rps"] for r in runs if not r["non_2xx"]]
    if not clean:
        raise SystemExit("every ramp step had non-2xx answers: see the instance logs")
    return max(clean), runs


# --------------------------------------------------------------------------- the soak


class RssSampler(threading.Thread):
    def __init__(self, cluster: cl.Cluster, every: float) -> None:
        super().__init__(daemon=True)
        self.cluster, self.every = cluster, every
        self.samples: list[tuple[float, list[int]]] = []
        self.loads: list[tuple[float, str]] = []
        self.stopping = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.stopping.is_set():
            now = time.monotonic() - self.start_time
            self.samples.append((now, [cl.rss_bytes(p) for p in self.cluster.instance_pids()]))
            self.loads.append((now, cl.loadavg()))
            self.stopping.wait(self.every)


def soak(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="tp-soak-"))
    cluster = cl.Cluster(args.instances, work, args.port_base)
    failures: list[str] = []
    try:
        cluster.start()
        print(
            f"soak: {args.instances} instances behind HAProxy on 127.0.0.1:{cluster.front}, "
            f"database {cluster.db}, {CORES} cores, load {cl.loadavg()}",
            flush=True,
        )
        capacity, _runs = measure_capacity(cluster, args.steps, args.ramp_seconds, work)
        rate = args.fraction * capacity
        print(
            f"capacity {capacity:.0f} tokens/s; holding {rate:.0f}/s ({args.fraction:.0%}) for "
            f"{args.minutes:g} min",
            flush=True,
        )
        sampler = RssSampler(cluster, args.sample)
        load = OpenLoop(
            "127.0.0.1", cluster.front, rate, cluster.pem, cluster.client_id, cluster.issuer,
            cl.RESOURCE,
        )  # fmt: skip
        servers = [pid for pids in cluster.instance_pids() for pid in pids]
        pg = cl.pg_backends(cluster.db)
        sampler.start()
        own0, t0, busy0 = os.times(), time.monotonic(), cl.machine_ticks()[0]
        cpu0 = (cl.ticks(servers), cl.ticks(pg))
        asyncio.run(load.run(args.minutes * 60))
        wall, own1 = time.monotonic() - t0, os.times()
        cpu = [
            (b - a) / cl.TICK for a, b in zip(cpu0, (cl.ticks(servers), cl.ticks(pg)), strict=True)
        ]
        busy = (cl.machine_ticks()[0] - busy0) / cl.TICK
        sampler.stopping.set()
        sampler.join()
        gen = sum(
            getattr(own1, f) - getattr(own0, f)
            for f in ("user", "system", "children_user", "children_system")
        )
        n = max(1, len(load.samples))
        print(f"\nduring the soak: instances {cpu[0] / wall:.2f} cores ({1000 * cpu[0] / n:.3f} ms "
              f"per request), PostgreSQL backends {cpu[1] / wall:.2f} cores ({1000 * cpu[1] / n:.3f} ms), "
              f"whole machine busy {busy / wall:.2f} of {CORES} cores")  # fmt: skip
        failures += report_soak(args, load, sampler, wall, gen)
        failures += verify_ledger(cluster, work, sum(1 for s in load.samples if s.status == 200))
        if bad := cluster.tracebacks():
            failures.append(f"tracebacks in {bad}")
    finally:
        cluster.stop(drop=not args.keep)
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps({"mode": "soak", "failures": failures}) + "\n")
    return 1 if failures else 0


def report_soak(
    args: argparse.Namespace, load: OpenLoop, sampler: RssSampler, wall: float, gen_cpu: float
) -> list[str]:
    failures = []
    samples = load.samples
    ok = sum(1 for s in samples if s.status == 200)
    print(f"\nrequests {len(samples):,} in {wall:.0f} s ({len(samples) / wall:.0f}/s); "
          f"200: {ok:,}; errors: {len(load.errors)}")  # fmt: skip
    print(f"load generator CPU: {1000 * gen_cpu / max(1, len(samples)):.3f} ms per request")
    for line in load.errors[:10]:
        print(f"  error: {line}")
    if load.errors:
        failures.append(f"{len(load.errors)} errors")
    print("minute   requests   p50 ms   p99 ms   max ms   load average")
    minutes = int(max((s.at for s in samples), default=0) // 60) + 1
    for m in range(minutes):
        lat = [s.latency * 1000 for s in samples if m * 60 <= s.at < (m + 1) * 60]
        loads = [la for t, la in sampler.loads if m * 60 <= t < (m + 1) * 60]
        print(f"{m + 1:>6} {len(lat):>10,} {pct(lat, 0.5):>8.1f} {pct(lat, 0.99):>8.1f} "
              f"{max(lat, default=0):>8.1f}   {loads[-1] if loads else ''}")  # fmt: skip
    warm = min(60.0, args.minutes * 60 / 5)
    after = [(t, r) for t, r in sampler.samples if t >= warm]
    if not after:
        return [*failures, "no RSS samples after the warm-up"]
    print(f"RSS per instance (start = first sample after the {warm:.0f} s warm-up; bound "
          f"{args.rss_bound:.0%} growth start -> end):")  # fmt: skip
    for i in range(len(after[0][1])):
        series = [r[i] for _t, r in after]
        first = series[0]
        end = statistics.median(series[-3:])  # the last 3 samples: one sample can be a GC blip
        growth = end / first - 1
        mb = 1 / (1 << 20)
        print(f"  tp{i + 1}: start {first * mb:6.1f} MiB  end {end * mb:6.1f} MiB  "
              f"max {max(series) * mb:6.1f} MiB  growth {growth:+.1%}")  # fmt: skip
        if growth > args.rss_bound:
            failures.append(f"tp{i + 1} RSS grew {growth:.1%} > {args.rss_bound:.0%}")
    return failures


def verify_ledger(cluster: cl.Cluster, work: Path, tokens: int) -> list[str]:
    env = cluster.env
    t0 = time.monotonic()
    cl.cli(env, "audit", "integrate")
    export, checkpoint = work / "ledger.jsonl", work / "checkpoint.txt"
    cl.cli(env, "audit", "export", "--out", str(export), "--checkpoint-out", str(checkpoint))
    key = cl.cli(env, "audit", "public-key").strip()
    verify = subprocess.run(
        [cl.trustplane(), "audit", "verify", str(export), "--checkpoint", str(checkpoint),
         "--public-key", key],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    issued = int(
        cl.psql(cluster.db, "SELECT count(*) FROM audit_leaves WHERE type = 'oauth:token:issued'")
    )
    pending = int(cl.psql(cluster.db, "SELECT count(*) FROM audit_pending"))
    size = sum(1 for _ in export.open("rb"))
    print(f"\naudit: {size:,} entries exported, {issued:,} oauth:token:issued leaves for "
          f"{tokens:,} tokens answered 200 (the ramp's tokens included in the leaves), "
          f"{pending} pending; integrate+export+verify {time.monotonic() - t0:.0f} s")  # fmt: skip
    print(
        f"audit verify: exit {verify.returncode}: {(verify.stdout + verify.stderr).strip()[:600]}"
    )
    failures = []
    if verify.returncode:
        failures.append("audit verify failed")
    if issued < tokens:
        failures.append(f"{tokens - issued} tokens without a ledger entry")
    return failures


# --------------------------------------------------------------------------- instances


def instances(args: argparse.Namespace) -> int:
    rows = []
    base: dict[str, Any] | None = None
    for n in (1, 2, 3):
        work = Path(tempfile.mkdtemp(prefix=f"tp-inst{n}-"))
        cluster = cl.Cluster(n, work, args.port_base)
        try:
            cluster.start()
            capacity, runs = measure_capacity(cluster, args.steps, args.ramp_seconds, work)
        finally:
            cluster.stop()
        best = max((r for r in runs if not r["non_2xx"]), key=lambda r: r["rps"])
        if base is None:
            base = best
        cost = base["cpu_ms_per_token"]
        total = sum(cost.values()) / 1000
        # the prediction: n single-threaded instances can use at most n cores' worth of their own
        # CPU; the whole path can use the cores the others leave (measured in this very run)
        free = CORES - best["others_cores"]
        predicted = min(n / (cost["instances"] / 1000), free / total)
        per_core_instances = 1000 / best["cpu_ms_per_token"]["instances"]
        rows.append((n, capacity, predicted, best, per_core_instances))
        print(f"{n} instance(s): {capacity:.0f} tokens/s measured, {predicted:.0f} predicted; "
              f"{capacity / CORES:.0f} tokens/s per machine core; {per_core_instances:.0f} tokens per "
              f"CPU-second of the instances; CPU ms/token {json.dumps({k: round(v, 3) for k, v in best['cpu_ms_per_token'].items()})}; "
              f"others used {best['others_cores']:.2f} cores; load {best['load']}", flush=True)  # fmt: skip
    print(
        "\n| instances | measured tokens/s | predicted | per machine core | per instance CPU-s "
        "| instances / PG / HAProxy / Redis / wrk CPU ms per token | others' cores | p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, capacity, predicted, best, per_core in rows:
        c = best["cpu_ms_per_token"]
        print(f"| {n} | {capacity:.0f} | {predicted:.0f} | {capacity / CORES:.0f} | {per_core:.0f} | "
              f"{c['instances']:.2f} / {c['postgresql']:.2f} / {c['haproxy']:.2f} / {c['redis']:.2f} / "
              f"{c['wrk']:.2f} | "
              f"{best['others_cores']:.2f} | {best['p99_ms']:.0f} |")  # fmt: skip
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps({"mode": "instances", "rows": [r[:4] for r in rows]}) + "\n")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", choices=("soak", "instances"), default="soak")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fraction", type=float, default=0.7)
    ap.add_argument("--instances", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 64],
                    help="connection counts of the capacity ramp")  # fmt: skip
    ap.add_argument("--ramp-seconds", type=int, default=8)
    ap.add_argument("--sample", type=float, default=5.0, help="RSS sampling interval (s)")
    ap.add_argument("--rss-bound", type=float, default=0.10)
    ap.add_argument("--port-base", type=int, default=27000)
    ap.add_argument("--keep", action="store_true", help="keep the database")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sys.exit(soak(args) if args.mode == "soak" else instances(args))


if __name__ == "__main__":
    main()
