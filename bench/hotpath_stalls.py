#!/usr/bin/env python3
"""Where a token request's tail latency waits: event-loop stalls, garbage collections, commits.

Starts ``trustplane serve --workers N`` with a diagnostic probe (``bench/_stallprobe``, loaded as
``sitecustomize``: nothing in the server changes), drives the client_credentials load of
``bench/hotpath.py`` with wrk, and reports over the measured run, for all workers together:

* event-loop lag (a task sleeping 5 ms, how late it woke): percentiles, and the share of wall time
  the loops spent in stalls over 10 / 20 ms;
* cyclic garbage collections by generation, with their pauses;
* group-commit batches: wall time from the batch's start to its ``COMMIT`` returning, and size;
* ledger sequencer rounds (``Ledger.integrate_all``): wall time, and the loop lag seen while one ran
  against while none did (on the worker that ran it).

  python bench/hotpath_stalls.py --store postgresql --workers 2 --connections 32
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotpath import OURS, Target, setup
from token_endpoint import _create_pg_database, make_bodies, run_wrk, stop

PROBE = Path(__file__).resolve().parent / "_stallprobe"


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def inside(t: float, spans: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in spans)


def report(data: dict[int, dict[str, Any]], t0: float, t1: float) -> None:
    lags, in_round, out_round = [], [], []
    gcs: dict[int, list[float]] = {}
    flush: list[tuple[float, float]] = []
    rounds: list[float] = []
    for d in data.values():
        spans = [(a, b) for a, b, _ in d["integrate"] if t0 <= a <= t1]
        rounds += [(b - a) * 1000 for a, b in spans]
        for t, lag in d["lag"]:
            if t0 <= t <= t1:
                lags.append(lag * 1000)
                (in_round if inside(t, spans) else out_round).append(lag * 1000)
        for t, gen, pause in d["gc"]:
            if t0 <= t <= t1:
                gcs.setdefault(int(gen), []).append(pause * 1000)
        flush += [((b - a) * 1000, n) for a, b, n in d["flush"] if t0 <= a <= t1]
    span = (t1 - t0) * 1000 * len(data)
    print(
        f"event-loop lag over {len(data)} loops, {len(lags)} probes (ms): p50 {pct(lags, 0.5):.1f}"
        f"  p90 {pct(lags, 0.9):.1f}  p99 {pct(lags, 0.99):.1f}  max {max(lags, default=0):.1f}"
    )
    for bound in (10, 20, 50):
        stalled = sum(x for x in lags if x > bound)
        print(
            f"  lags over {bound} ms: {sum(1 for x in lags if x > bound)}, "
            f"{100 * stalled / span:.1f}% of the loops' wall time"
        )
    print(
        f"  while a sequencer round ran: p50 {pct(in_round, 0.5):.1f}  p99 {pct(in_round, 0.99):.1f}"
        f"  max {max(in_round, default=0):.1f} ms ({len(in_round)} probes); otherwise p50 "
        f"{pct(out_round, 0.5):.1f}  p99 {pct(out_round, 0.99):.1f}  max "
        f"{max(out_round, default=0):.1f} ms"
    )
    for gen, pauses in sorted(gcs.items()):
        print(
            f"gc generation {gen}: {len(pauses)} collections, pause p50 {pct(pauses, 0.5):.2f}"
            f"  max {max(pauses):.2f}  total {sum(pauses):.0f} ms"
        )
    walls = [w for w, _ in flush]
    sizes = [n for _, n in flush]
    print(
        f"group commits: {len(flush)}, size mean {statistics.fmean(sizes or [0]):.1f}, wall p50 "
        f"{pct(walls, 0.5):.1f}  p90 {pct(walls, 0.9):.1f}  p99 {pct(walls, 0.99):.1f}  max "
        f"{max(walls, default=0):.1f} ms"
    )
    print(f"sequencer rounds: {len(rounds)}, wall p50 {pct(rounds, .5):.1f}  max "
          f"{max(rounds, default=0):.1f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="postgresql")
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--expect-rps", type=float, default=3000)
    ap.add_argument("--port-base", type=int, default=26500)
    ap.add_argument("--tree", type=Path, default=OURS, help="the source tree to run (has src/)")
    args = ap.parse_args()
    args.reps, args.warmup = 1, 3
    root = Path(tempfile.mkdtemp(prefix="tp-stalls-"))
    probes = root / "probes"
    probes.mkdir()
    target: Target | None = None
    try:
        target = setup("ours", args.tree.resolve() / "src", args.store, args, root,
                       extra={"TP_STALL_DIR": str(probes)}, first=PROBE)  # fmt: skip
        url = f"{target.issuer}/token"
        warm = root / "warm.bodies"
        make_bodies(warm, int(args.expect_rps * 4), target.pem, target.client_id, target.issuer)
        run_wrk(url, warm, args.connections, 3, target.proc.pid)
        bodies = root / "load.bodies"
        make_bodies(bodies, int(args.expect_rps * args.duration * 1.5), target.pem,
                    target.client_id, target.issuer)  # fmt: skip
        t0 = time.monotonic()
        result = run_wrk(url, bodies, args.connections, args.duration, target.proc.pid)
        t1 = time.monotonic()
        time.sleep(2.5)  # the probes write every 2 s
        print(f"{args.store}, {args.workers} workers, c={args.connections}: {result['rps']:.0f} "
              f"tokens/s, p50 {result['p50_ms']:.1f} p99 {result['p99_ms']:.1f} ms, cpu "
              f"{result['cpu_ms_per_req']:.3f} ms/token")  # fmt: skip
        data = {int(p.stem): json.loads(p.read_text()) for p in probes.glob("*.json")}
        report(data, t0, t1)
    finally:
        if target is not None:
            if target.proc is not None:
                stop(target.proc)
            if target.pg_name:
                import asyncio

                asyncio.run(_create_pg_database(args.database_url, target.pg_name, drop=True))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
