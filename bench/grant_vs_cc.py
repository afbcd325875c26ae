"""One grant against client_credentials over HTTP, same server, same run: the driver that
``jwt_bearer.py`` and ``token_exchange.py`` share.

A bench supplies ``setup(env, work) -> (client_id, secrets)`` (register what the grant needs, before
the server starts) and ``write_bodies(path, n, grant_type, ctx)`` (pre-generate ``n`` single-use
request bodies for ``grant_type``); this module starts the server, runs warm-up plus ``--reps``
repetitions of each grant with wrk, the two grants alternated (A B, B A, ...), and prints and
returns the summary with the ratio (medians; ``ratios``: each repetition's pair, the rate ratio of
the grant to the client_credentials run beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import token_endpoint as te
from _common import free_port, wait_ready

Setup = Callable[[dict[str, str], Path], tuple[str, Any]]
WriteBodies = Callable[[Path, int, str, dict[str, Any]], None]


def arguments(
    description: str | None, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The common options; ``extra`` adds a bench's own."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--database-url", default="", help="PostgreSQL admin URL (a fresh db is made)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rest", type=float, default=1.0)
    ap.add_argument(
        "--bodies",
        type=int,
        help="pre-generated single-use requests per rep (default: 10,000 per second of --duration, "
        "above what a 2-core machine serves: a body sent twice is refused as a replay, and those "
        "quick refusals would count as throughput)",
    )
    ap.add_argument("--json", type=Path, help="append a JSON summary line to this file")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required (apt-get install wrk)")
    if args.bodies is None:
        args.bodies = 10_000 * max(args.duration, args.warmup)
    return args


def _rep(
    label: str,
    grant_type: str,
    rep: int,
    pid: int,
    args: argparse.Namespace,
    ctx: dict[str, Any],
    write_bodies: WriteBodies,
) -> dict[str, float] | None:
    """One repetition of ``grant_type`` (rep 0 warms up and is discarded: None)."""
    bodies = Path(ctx["work"]) / f"{label}-{rep}.bodies"
    write_bodies(bodies, args.bodies, grant_type, ctx)
    time.sleep(args.rest)
    duration = args.warmup if rep == 0 else args.duration
    result = te.run_wrk(f"{ctx['issuer']}/token", bodies, args.connections, duration, pid)
    bodies.unlink()
    if not rep:
        return None
    print(
        f"  {label:<18} rep {rep}: {result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.1f} ms"
        f"  p99 {result['p99_ms']:6.1f} ms  cpu {result['cpu_ms_per_req']:.3f} ms/req"
        f"  non-2xx {result['non_2xx']:.0f}",
        flush=True,
    )
    return result


def _alternated(
    grants: list[tuple[str, str]],
    pid: int,
    args: argparse.Namespace,
    ctx: dict[str, Any],
    write_bodies: WriteBodies,
) -> dict[str, list[dict[str, float]]]:
    """Every repetition runs each grant once, in turn, the order reversed every other repetition
    (A B, B A, ...): a load that drifts during the run (other processes on the machine) weighs on
    both grants alike instead of on whichever ran last."""
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in grants}
    for rep in range(args.reps + 1):  # rep 0 warms up and is discarded
        for label, grant_type in grants if rep % 2 == 0 else grants[::-1]:
            result = _rep(label, grant_type, rep, pid, args, ctx, write_bodies)
            if result is not None:
                results[label].append(result)
    return results


def run(
    args: argparse.Namespace,
    *,
    name: str,
    grant_type: str,
    setup: Setup,
    write_bodies: WriteBodies,
) -> dict[str, Any]:
    """Serve, measure client_credentials then ``grant_type``, print the summary (keys ``<name>_*``)."""
    work = Path(tempfile.mkdtemp(prefix=f"tp-bench-{name}-"))
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    env, pg_name = te.server_env(work, port, args.database_url)
    server, keep = None, False
    try:
        client_id, secrets = setup(env, work)
        server = te.start(
            [str(te.BIN / "trustplane"), "serve", "--workers", str(args.workers)],
            env,
            work / "server.log",
        )
        wait_ready(f"{issuer}/healthz")
        store = "postgresql" if pg_name else "sqlite"
        print(
            f"trustplane: {store}, {args.workers} worker(s), {args.connections} connections, "
            f"{args.duration}s x {args.reps}",
            flush=True,
        )
        ctx = {"work": work, "issuer": issuer, "client_id": client_id, "secrets": secrets}
        grants = [("client_credentials", "client_credentials"), (name, grant_type)]
        measured = _alternated(grants, server.pid, args, ctx, write_bodies)
        cc, grant = measured["client_credentials"], measured[name]
        summary: dict[str, Any] = {
            "store": store,
            "workers": args.workers,
            "connections": args.connections,
            f"{name}_per_s": te.median(grant, "rps"),
            f"{name}_p50_ms": te.median(grant, "p50_ms"),
            f"{name}_p99_ms": te.median(grant, "p99_ms"),
            f"{name}_cpu_ms": te.median(grant, "cpu_ms_per_req"),
            "client_credentials_per_s": te.median(cc, "rps"),
            "client_credentials_p50_ms": te.median(cc, "p50_ms"),
            "client_credentials_p99_ms": te.median(cc, "p99_ms"),
            "client_credentials_cpu_ms": te.median(cc, "cpu_ms_per_req"),
            "non_2xx": sum(r["non_2xx"] for r in grant + cc),
        }
        summary["ratio_to_client_credentials"] = (
            summary[f"{name}_per_s"] / summary["client_credentials_per_s"]
        )
        summary["ratios"] = [round(g["rps"] / c["rps"], 3) for g, c in zip(grant, cc, strict=True)]
        summary["cpu_ratio"] = summary[f"{name}_cpu_ms"] / summary["client_credentials_cpu_ms"]
        print(json.dumps(summary, indent=2))
        if summary["non_2xx"]:
            keep = True
            print(f"WARNING: {summary['non_2xx']:.0f} non-2xx responses; see {work / 'server.log'}")
        if args.json:
            with args.json.open("a") as handle:
                handle.write(json.dumps(summary) + "\n")
        return summary
    finally:
        if server is not None:
            te.stop(server)
        if pg_name:
            asyncio.run(te._create_pg_database(args.database_url, pg_name, drop=True))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def client_form(
    sign: Callable[[dict[str, object]], str], a: dict[str, str], i: int
) -> dict[str, str]:
    """The form of request ``i``: ``a["grant_type"]``, scope, resource and a fresh client assertion
    (jti ``<prefix>-c<i>``) signed by ``sign``; the grant adds its own parameters."""
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": a["client_id"],
        "sub": a["client_id"],
        "aud": a["issuer"],
        "iat": now,
        "exp": now + 290,
        "jti": f"{a['prefix']}-c{i}",
    }
    return {
        "grant_type": a["grant_type"],
        "scope": "order:create",
        "resource": te.RESOURCE,
        "client_assertion_type": te.ASSERTION_TYPE,
        "client_assertion": sign(claims),
    }
