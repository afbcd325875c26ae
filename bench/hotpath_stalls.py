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
  against while none did (on the worker that ran it);
* the proof cache's fills of its lower levels (``ProofNodes.fill``): how many, nodes read, wall;
* the token requests' time in the app, and what the slowest 1 % of them overlapped, against all
  requests: a sequencer round on their own worker or on the other, a fill, a group commit slower
  than 50 ms, a collection of generation 1 or 2.

``--reps N`` runs N measured runs against the same server with ``--gap`` seconds of rest between
(as ``side_by_side.sh`` does while the peer runs), each reported apart: whatever changes from the
first run to the last (a warm-up, a backlog, a table's statistics) shows as a trend.

  python bench/hotpath_stalls.py --store postgresql --workers 2 --connections 32
  python bench/hotpath_stalls.py --store postgresql --reps 5 --gap 15
"""

from __future__ import annotations

import argparse
import array
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
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


def overlaps(a: float, b: float, spans: list[tuple[float, float]]) -> bool:
    return any(x <= b and a <= y for x, y in spans)


def attribute(data: dict[int, dict[str, Any]], reqs: dict[int, Any], t0: float, t1: float) -> None:
    """What the slowest 1 % of the requests overlapped, against all of them."""
    per: list[tuple[float, float, int]] = []
    for pid, flat in reqs.items():
        per += [
            (flat[i], flat[i + 1], pid) for i in range(0, len(flat) - 1, 2) if t0 <= flat[i] <= t1
        ]
    if not per:
        return
    walls = sorted((b - a) * 1000 for a, b, _ in per)
    p50, p99 = pct(walls, 0.5), pct(walls, 0.99)
    spans = {pid: {
        "own round": [(a, b) for a, b, _ in d["integrate"]],
        "fill": [(a, b) for a, b, _ in d.get("fill", [])],
        "commit > 50 ms": [(a, b) for a, b, _ in d["flush"] if b - a > 0.05],
        "gc gen >= 1": [(t - p, t) for t, g, p in d["gc"] if g >= 1],
        "gc pause > 5 ms": [(t - p, t) for t, _, p in d["gc"] if p > 0.005],
    } for pid, d in data.items()}  # fmt: skip
    marks = checkpoints(data)
    for pid in spans:
        spans[pid]["checkpoint"] = marks
        spans[pid]["other's round"] = [
            s for other in spans if other != pid for s in spans[other]["own round"]
        ]
    slow = [r for r in per if (r[1] - r[0]) * 1000 >= p99]
    print(f"  requests in the app: {len(per)}, p50 {p50:.1f}  p99 {p99:.1f}  max {walls[-1]:.1f} ms;"
          f" the slowest 1 % ({len(slow)}) overlapped / all requests did:")  # fmt: skip
    for what in ("own round", "other's round", "fill", "commit > 50 ms", "gc gen >= 1",
                 "gc pause > 5 ms", "checkpoint"):  # fmt: skip
        share = [sum(overlaps(a, b, spans[p][what]) for a, b, p in group) / len(group)
                 for group in (slow, per)]  # fmt: skip
        print(f"    {what:<16} {100 * share[0]:5.1f} % / {100 * share[1]:5.1f} %")


PG_LOG = Path("/var/log/postgresql/postgresql-15-main.log")
_CHECKPOINT = re.compile(r"^(\S+ \S+) UTC .*checkpoint (starting|complete)")


def checkpoints(data: dict[int, dict[str, Any]]) -> list[tuple[float, float]]:
    """PostgreSQL's checkpoints (start, end) from its log (``log_checkpoints``), on the probes'
    monotonic clock; none if the log is not readable here."""
    clock = next((d["clock"][0] for d in data.values() if d.get("clock")), None)
    if clock is None or not PG_LOG.exists():
        return []
    offset = clock[0] - clock[1]
    spans, start = [], None
    for line in PG_LOG.read_text(errors="replace").splitlines()[-5000:]:
        m = _CHECKPOINT.match(line)
        if m is None:
            continue
        t = datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC).timestamp() + offset
        if m.group(2) == "starting":
            start = t
        elif start is not None:
            spans.append((start, t))
            start = None
    return spans


def commits(data: dict[int, dict[str, Any]], t0: float, t1: float) -> None:
    """Whether the slow group commits overlapped the sequencer's writing statements (any worker:
    a commit flushes all the WAL written before its own record) or a checkpoint."""
    moves = [(a, b) for d in data.values() for a, b, _ in d.get("move", [])]
    marks = checkpoints(data)
    flushes = [(a, b) for d in data.values() for a, b, _ in d["flush"] if t0 <= a <= t1]
    slow = [(a, b) for a, b in flushes if b - a > 0.05]
    if not flushes:
        return
    share = [
        [
            sum(overlaps(a, b, spans) for a, b in group) / max(len(group), 1)
            for group in (slow, flushes)
        ]
        for spans in (moves, marks)
    ]
    in_marks = sum(b - a for a, b in marks if t0 <= a <= t1)
    print(f"  commits over 50 ms: {len(slow)} of {len(flushes)}; overlapped a sequencer write "
          f"{100 * share[0][0]:.0f} % (all commits {100 * share[0][1]:.0f} %), a checkpoint "
          f"{100 * share[1][0]:.0f} % (all {100 * share[1][1]:.0f} %; {in_marks:.1f} s of "
          f"checkpoints began in the run)")  # fmt: skip


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
    fills = [(b - a, n) for d in data.values() for a, b, n in d.get("fill", []) if t0 <= a <= t1]
    print(f"proof cache fills: {len(fills)}, nodes read {sum(n for _, n in fills):.0f}, wall "
          f"total {1000 * sum(w for w, _ in fills):.0f} ms")  # fmt: skip


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
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("BENCH_PORT", "26500")))
    ap.add_argument("--tree", type=Path, default=OURS, help="the source tree to run (has src/)")
    ap.add_argument("--reps", type=int, default=1, help="measured runs against the same server")
    ap.add_argument("--gap", type=float, default=0.0, help="seconds of rest between runs")
    ap.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for the server")
    args = ap.parse_args()
    reps = args.reps
    args.warmup = 3
    extra = dict(kv.split("=", 1) for kv in args.env)
    root = Path(tempfile.mkdtemp(prefix="tp-stalls-"))
    probes = root / "probes"
    probes.mkdir()
    target: Target | None = None
    try:
        target = setup("ours", args.tree.resolve() / "src", args.store, args, root,
                       extra={"TP_STALL_DIR": str(probes), **extra}, first=PROBE)  # fmt: skip
        url = f"{target.issuer}/token"
        warm = root / "warm.bodies"
        make_bodies(warm, int(args.expect_rps * 4), target.pem, target.client_id, target.issuer)
        run_wrk(url, warm, args.connections, 3, target.proc.pid)
        for rep in range(1, reps + 1):
            if rep > 1:
                time.sleep(args.gap)
            bodies = root / "load.bodies"
            make_bodies(bodies, int(args.expect_rps * args.duration * 1.5), target.pem,
                        target.client_id, target.issuer)  # fmt: skip
            t0 = time.monotonic()
            result = run_wrk(url, bodies, args.connections, args.duration, target.proc.pid)
            t1 = time.monotonic()
            time.sleep(2.5)  # the probes write every 2 s
            print(f"\nrep {rep}: {args.store}, {args.workers} workers, c={args.connections}: "
                  f"{result['rps']:.0f} tokens/s, p50 {result['p50_ms']:.1f} p99 "
                  f"{result['p99_ms']:.1f} ms, cpu {result['cpu_ms_per_req']:.3f} ms/token, "
                  f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
            data = {int(p.stem): json.loads(p.read_text()) for p in probes.glob("*.json")}
            reqs = {int(p.stem): array.array("d", p.read_bytes()) for p in probes.glob("*.req")}
            report(data, t0, t1)
            attribute(data, reqs, t0, t1)
            commits(data, t0, t1)
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
