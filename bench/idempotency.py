#!/usr/bin/env python3
"""Idempotency-Key cost over HTTP on loopback: one uvicorn worker, driven by wrk.

Starts bench/idempotency_app.py: one trivial JSON handler behind ``/plain`` (called directly) and
``/settlements`` (through ``IdempotentOperation`` with a fixed scope, no token and no PEP, so the
difference is the idempotency cost alone). Each repetition runs, in the same server:

- ``plain``: ``/plain``, no key (the baseline);
- ``fresh``: ``/settlements`` with a new key per request: a SELECT that finds nothing, the claim
  (INSERT ... ON CONFLICT DO UPDATE ... RETURNING) and complete (UPDATE), two committed statements;
- ``replay``: ``/settlements`` re-sending keys completed before the run, with the same body: one
  SELECT finds the row and the stored response is returned.

The store is SQLite in a temp file (synchronous=FULL, as trustplane configures it) by default, or a
fresh PostgreSQL database made on the server of --database-url (and dropped at the end), so runs
never collide with each other or with tests using that database. Repetition 0 is a
warm-up and is discarded; the medians of the others are reported with the ratio to ``plain``,
server CPU per request (from /proc), and checks that every ``fresh`` request executed and every
``replay`` request replayed (the app's ``trustplane_pep_idempotency_total`` counters).

  python bench/idempotency.py                                    # SQLite, 32 connections, 5 s x 3
  python bench/idempotency.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, wait_ready
from token_endpoint import TICK, process_tree_ticks, start, stop

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
VARIANTS = ("plain", "fresh", "replay")
BODY = {"instruction_id": "SI-1", "trade_id": "T-1", "amount_minor": 125_000, "currency": "EUR"}
Result = dict[str, float]


# --------------------------------------------------------------------------- wrk


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, lua_args: list[str], args: argparse.Namespace, duration: int) -> Result:
    command = [
        "wrk",
        "-t1",
        f"-c{args.connections}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "30s",
    ]
    command += ["-s", str(HERE / "idempotency.lua"), url, "--", *lua_args]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": float(
            sum(map(int, re.findall(r"(?:connect|read|write|timeout) (\d+)", out)))
        ),
    }


# --------------------------------------------------------------------------- the server


def counts(base: str) -> dict[str, float]:
    return dict(httpx.get(f"{base}/counts", timeout=10).json())


def check_and_prepare(base: str, body: bytes, n_keys: int, keys_file: Path) -> None:
    """One request of each kind answers as expected; ``n_keys`` keys are completed for replays."""
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        assert client.post("/plain", content=body).status_code == 201
        missing = client.post("/settlements", content=body)
        assert missing.status_code == 400, missing.text
        keys = [f"replay-{uuid.uuid4().hex}" for _ in range(n_keys)]
        for key in keys:
            first = client.post(
                "/settlements", content=body, headers={"Idempotency-Key": f'"{key}"'}
            )
            assert first.status_code == 201, first.text
            assert "idempotency-replayed" not in first.headers
        again = client.post("/settlements", content=body, headers={"Idempotency-Key": f'"{key}"'})
        assert again.status_code == 201, again.text
        assert again.headers["idempotency-replayed"] == "true"
        assert again.content == first.content
    keys_file.write_text("\n".join(keys) + "\n")


def measure(
    variant: str, base: str, pid: int, files: dict[str, Path], args: argparse.Namespace, rep: int
) -> Result:
    if variant == "plain":
        url, lua_args = f"{base}/plain", [str(files["body"]), "none"]
    elif variant == "fresh":
        prefix = f"fresh-{rep}-{uuid.uuid4().hex[:8]}"
        url, lua_args = f"{base}/settlements", [str(files["body"]), "fresh", prefix]
    else:
        url, lua_args = f"{base}/settlements", [str(files["body"]), "replay", str(files["keys"])]
    time.sleep(args.rest)
    before, ticks = counts(base), process_tree_ticks(pid)
    result = run_wrk(url, lua_args, args, args.warmup if rep == 0 else args.duration)
    cpu_s = (process_tree_ticks(pid) - ticks) / TICK
    after = counts(base)
    result["cpu_ms_per_req"] = 1000.0 * cpu_s / max(result["requests"], 1.0)
    for outcome in ("executed", "replayed", "in_progress", "mismatch", "released"):
        result[outcome] = after.get(outcome, 0.0) - before.get(outcome, 0.0)
    return result


def _check(variant: str, result: Result, connections: int) -> str:
    """Whether the server did what the variant means; wrk stops with up to ``connections``
    requests in flight, which the server may have handled without wrk counting them."""
    expected = {"plain": {}, "fresh": {"executed": 1}, "replay": {"replayed": 1}}[variant]
    for outcome in ("executed", "replayed", "in_progress", "mismatch", "released"):
        got, want = result[outcome], result["requests"] * expected.get(outcome, 0)
        if not want <= got <= want + connections:
            return f"  CHECK FAILED: {outcome} {got:.0f}, expected {want:.0f}"
    return ""


def bench(base: str, pid: int, files: dict[str, Path], args: argparse.Namespace) -> Any:
    results: dict[str, list[Result]] = {variant: [] for variant in VARIANTS}
    for rep in range(args.reps + 1):  # rep 0 warms up and is discarded
        for variant in VARIANTS:
            result = measure(variant, base, pid, files, args, rep)
            problem = _check(variant, result, args.connections)
            label = "warm-up" if rep == 0 else f"rep {rep}"
            print(
                f"  {variant:<7} {label:<7}: {result['rps']:7.0f} req/s  "
                f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
                f"cpu {result['cpu_ms_per_req']:.3f} ms/req  non-2xx {result['non_2xx']:.0f}  "
                f"socket errors {result['socket_errors']:.0f}"
                f"{problem}",
                flush=True,
            )
            if problem or result["non_2xx"] or result["socket_errors"]:
                raise SystemExit(f"the {variant} run is not clean")
            if rep:
                results[variant].append(result)
    return results


def summarize(results: dict[str, list[Result]], store: str, args: argparse.Namespace) -> Any:
    def med(variant: str, key: str) -> float:
        return round(statistics.median(r[key] for r in results[variant]), 3)

    summary: dict[str, Any] = {
        "store": store,
        "workers": 1,
        "connections": args.connections,
        "duration_s": args.duration,
        "reps": args.reps,
        "note": "/settlements has a fixed scope and no PEP/token: this isolates the idempotency cost",
    }
    for variant in VARIANTS:
        row = {key: med(variant, key) for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req")}
        if variant != "plain":
            row["rps_ratio_to_plain"] = round(row["rps"] / med("plain", "rps"), 3)
            row["cpu_ms_added"] = round(row["cpu_ms_per_req"] - med("plain", "cpu_ms_per_req"), 3)
        summary[variant] = row
    summary["load_avg_1_5_15"] = [round(load, 2) for load in os.getloadavg()]
    return summary


# --------------------------------------------------------------------------- PostgreSQL


async def _pg_admin(admin_url: str, sql: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from trustplane.storage.db import async_url

    engine = create_async_engine(async_url(admin_url), isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text(sql))
    await engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--database-url", default="", help="PostgreSQL admin URL (a fresh database)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rest", type=float, default=0.5)
    ap.add_argument("--replay-keys", type=int, default=500, help="keys completed for replays")
    ap.add_argument("--json", type=Path, help="append a JSON summary line to this file")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="tp-bench-idem-"))
    pg_name = f"tp_bench_idem_{uuid.uuid4().hex[:8]}" if args.database_url else ""
    database_url = f"sqlite:///{work / 'idempotency.db'}"
    if pg_name:
        asyncio.run(_pg_admin(args.database_url, f'CREATE DATABASE "{pg_name}"'))
        database_url = args.database_url.rsplit("/", 1)[0] + f"/{pg_name}"
    store = "postgresql" if pg_name else "sqlite"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(HERE), "IDEM_BENCH_DATABASE_URL": database_url}
    command = [str(BIN / "uvicorn"), "--factory", "idempotency_app:app_from_env"]
    command += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    server = None
    try:
        server = start(command, env, work / "server.log")
        wait_ready(f"{base}/counts")
        files = {"body": work / "body.json", "keys": work / "keys.txt"}
        body = json.dumps(BODY).encode()
        files["body"].write_bytes(body)
        check_and_prepare(base, body, args.replay_keys, files["keys"])
        print(
            f"idempotency: {store}, 1 worker, {args.connections} connections, "
            f"{args.duration}s x {args.reps} (+{args.warmup}s warm-up), "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            flush=True,
        )
        summary = summarize(bench(base, server.pid, files, args), store, args)
        print(json.dumps(summary, indent=2))
        if args.json:
            with args.json.open("a") as handle:
                handle.write(json.dumps(summary) + "\n")
    except BaseException:
        log = work / "server.log"
        if log.exists():
            print("server log (tail):", *log.read_text().splitlines()[-20:], sep="\n")
        raise
    finally:
        if server is not None:
            stop(server)
        if pg_name:
            sql = f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'
            asyncio.run(_pg_admin(args.database_url, sql))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
