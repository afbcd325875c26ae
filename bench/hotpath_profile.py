#!/usr/bin/env python3
"""Where a token request's CPU goes: py-spy on every worker of a loaded ``trustplane serve``.

Starts the server (``--workers``, SQLite or PostgreSQL), drives client_credentials +
private_key_jwt load with wrk as ``bench/hotpath.py`` does, and records the workers with
``py-spy record --subprocesses`` (sampling; the server is not restarted or instrumented) while the
load runs. Prints the top functions by self time (the sampled frame is the function's own code) and
by cumulative time (the function is anywhere on the stack), as % of the non-idle samples, and keeps
the collapsed stacks (``--out``; ``flamegraph.pl`` or speedscope draw them).

py-spy is not a dependency of trustplane: ``pip install py-spy`` (any environment; pass
``--py-spy PATH``). It needs ptrace rights over the server (root, or the same user with
``kernel.yama.ptrace_scope=0``).

py-spy samples wall time: a worker that is runnable but waiting for a core counts as busy in the
frame it was preempted in, and on a loaded machine that is most often a system call that woke
another process (the response's ``write`` waking wrk, a statement's waking a PostgreSQL backend),
so those frames are overweighted. ``--perf FILE`` records the workers with ``perf`` instead
(on-CPU samples only, kernel included; Python code shows as the interpreter, C libraries by
name): the split between Python, OpenSSL, the kernel and the C extensions.

  python bench/hotpath_profile.py --workers 2 --connections 32
  python bench/hotpath_profile.py --workers 2 --store postgresql
  python bench/hotpath_profile.py --store postgresql --perf /tmp/workers.perf
  perf report -i /tmp/workers.perf --no-children --sort dso
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import tree
from hotpath import OURS, Target, setup
from token_endpoint import _create_pg_database, make_bodies, run_wrk, stop

LINE = re.compile(r":\d+\)")
#: Where a sample's time belongs: the first of these found on its stack.
PARTS = (
    ("pool checkout ping (pool_pre_ping)", "AsyncAdapt_asyncpg_connection._async_ping"),
    ("request handler", "RequestResponseCycle.run_asgi"),
    ("group-commit writer", "GroupCommitWriter._run"),
    ("ledger sequencer", "Ledger.run"),
    ("aiosqlite thread (SQLite calls, fsync)", "_connection_worker_thread"),
)


Counts = list[tuple[str, int]]


def top(collapsed: Path, limit: int) -> tuple[int, Counts, Counts, Counts]:
    """(samples, top self, top cumulative, parts) from py-spy's raw (collapsed) output; a frame is
    ``function (file)``, line numbers merged; the process frames py-spy puts first are dropped, and
    so are frames under which nearly every sample sits (the worker's bootstrap and event loop)."""
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [LINE.sub(")", f) for f in stack.split(";") if "process " not in f[:9]]
        frames = [f for f in frames if "spawn_main(" not in f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            cumulative[frame] += n
        names = [f.split(" (")[0] for f in frames]
        parts[next((label for label, fn in PARTS if fn in names), "other")] += n
    busy = [(f, c) for f, c in cumulative.most_common() if c < 0.8 * total]
    return total, own.most_common(limit), busy[:limit], parts.most_common()


def short(frame: str) -> str:
    """``name (path/to/site-packages/pkg/mod.py)`` as ``name (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"


def report(collapsed: Path, limit: int) -> None:
    total, own, cumulative, parts = top(collapsed, limit)
    print(f"{total} non-idle samples\n\n%       part")
    for label, n in parts:
        print(f"{100 * n / total:6.1f}   {label}")
    for title, rows in (("self", own), ("cumulative", cumulative)):
        print(f"\n{title} %   function")
        for frame, n in rows:
            print(f"{100 * n / total:6.1f}   {short(frame)}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--expect-rps", type=float, default=3000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument("--out", type=Path, help="keep the collapsed stacks here")
    ap.add_argument("--port-base", type=int, default=26300)
    ap.add_argument("--tree", type=Path, default=OURS, help="the source tree to run (has src/)")
    ap.add_argument("--report", type=Path, help="only summarise these collapsed stacks")
    ap.add_argument(
        "--perf",
        type=Path,
        help="record the workers with perf instead (on-CPU samples only, kernel and C libraries "
        "included, no Python frames) into this file; read it with perf report --sort dso,sym",
    )
    ap.add_argument(
        "--native", action="store_true", help="py-spy --native: C frames (uvloop, asyncpg, OpenSSL)"
    )
    args = ap.parse_args()
    if args.report:
        report(args.report, args.top)
        return
    args.reps, args.warmup = 1, 3
    root = Path(tempfile.mkdtemp(prefix="tp-profile-"))
    target: Target | None = None
    try:
        target = setup("ours", args.tree.resolve() / "src", args.store, args, root)
        url = f"{target.issuer}/token"
        warm = root / "warm.bodies"
        make_bodies(warm, int(args.expect_rps * 4), target.pem, target.client_id, target.issuer)
        run_wrk(url, warm, args.connections, 3, target.proc.pid)
        bodies = root / "load.bodies"
        n = int(args.expect_rps * (args.duration + 4) * 1.5)
        make_bodies(bodies, n, target.pem, target.client_id, target.issuer)
        collapsed = args.out or root / "stacks.txt"
        workers = ",".join(str(pid) for pid in tree(target.proc.pid)[1:])
        command = [
            "perf", "record", "-g", "-F", str(args.rate), "-o", str(args.perf), "-p", workers,
            "--", "sleep", str(args.duration),
        ] if args.perf else [
                args.py_spy, "record", "--pid", str(target.proc.pid), "--subprocesses",
                *([] if args.native else ["--nonblocking"]),
                "--rate", str(args.rate), "--format", "raw",
                "--duration", str(args.duration), "--output", str(collapsed),
                *(["--native"] if args.native else []),
            ]  # fmt: skip
        spy = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        result = run_wrk(url, bodies, args.connections, args.duration + 2, target.proc.pid)
        spy.wait(timeout=60)
        print(
            f"{args.store}, {args.workers} workers, c={args.connections}: "
            f"{result['rps']:.0f} tokens/s under {'perf' if args.perf else 'py-spy'} ({args.rate} Hz)"
        )
        if not args.perf:
            report(collapsed, args.top)
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
