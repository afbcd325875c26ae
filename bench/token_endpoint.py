#!/usr/bin/env python3
"""Token endpoint load: client_credentials + private_key_jwt over HTTP on loopback.

Starts a real `trustplane serve` (SQLite by default, PostgreSQL with --database-url, Redis replay
cache with --redis-url), registers a client, and for each repetition pre-generates one fresh ES256
client assertion per request (each sent exactly once, as a replay-protected endpoint requires), then
drives it with wrk at --connections concurrent connections. The same load then runs against
bench/baseline_app.py (form parse + assertion verify + token sign, nothing else) in this same script,
and the ratio is printed. Reports tokens/s, p50/p99 latency, server CPU per token, non-2xx count.

  python bench/token_endpoint.py                                  # SQLite, 1 worker, 32 connections
  python bench/token_endpoint.py --database-url postgresql://postgres@127.0.0.1:5432/test --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import ticks, tree
from _common import free_port, wait_ready

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
RESOURCE = "https://execution.example/api"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TICK = os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def process_tree_ticks(root: int) -> int:
    """utime + stime so far of ``root`` and every process under it."""
    return ticks(tree(root))


_KEY = None
_ARGS: dict[str, str] = {}


def _init(pem: bytes, args: dict[str, str]) -> None:
    global _KEY, _ARGS
    from trustplane.jose.jws import Signer

    key = serialization.load_pem_private_key(pem, password=None)
    _KEY = Signer(key, "ES256", "bench-key", typ="JWT")  # type: ignore[arg-type]
    _ARGS = args


def _body(i: int) -> str:
    now = int(time.time())
    a = _ARGS
    assertion = _KEY.sign(  # type: ignore[union-attr]
        {
            "iss": a["client_id"],
            "sub": a["client_id"],
            "aud": a["issuer"],
            "iat": now,
            "exp": now + 290,
            "jti": f"{a['prefix']}-{i}",
        }
    )
    return urlencode(
        {
            "grant_type": "client_credentials",
            "scope": "order:create",
            "resource": RESOURCE,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
    )


def make_bodies(path: Path, n: int, pem: bytes, client_id: str, issuer: str) -> None:
    args = {"client_id": client_id, "issuer": issuer, "prefix": uuid.uuid4().hex[:12]}
    with mp.Pool(os.cpu_count() or 1, initializer=_init, initargs=(pem, args)) as pool:
        lines = pool.map(_body, range(n), chunksize=2000)
    path.write_text("\n".join(lines) + "\n")


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(
    url: str, bodies: Path, connections: int, duration: int, server_pid: int
) -> dict[str, float]:
    before = process_tree_ticks(server_pid)
    proc = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(HERE / "once.lua"),
            url,
            "--",
            str(bodies),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    cpu_s = (process_tree_ticks(server_pid) - before) / TICK
    out = proc.stdout
    if "wrapped" in proc.stderr:
        raise SystemExit("wrk ran out of pre-generated bodies: raise --bodies")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": 1.0 if errors else 0.0,
        "requests": float(requests),
        "cpu_ms_per_req": 1000.0 * cpu_s / max(requests, 1),
    }


def cli(*args: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [str(BIN / "trustplane"), *args], env=env, capture_output=True, text=True, check=True
    ).stdout


def server_env(work: Path, port: int, database_url: str) -> tuple[dict[str, str], str]:
    """The environment of a bench server on ``port`` with its data in ``work``: a new KEK, and on
    PostgreSQL (``database_url`` given) a fresh database, whose name is returned ("" on SQLite)."""
    env = {
        **os.environ,
        "TRUSTPLANE_DATA_DIR": str(work / "data"),
        "TRUSTPLANE_PORT": str(port),
        # its own operations listener: the default 127.0.0.1:9464 may be another server's
        "TRUSTPLANE_OPS_PORT": str(free_port()),
        "TRUSTPLANE_LOG_LEVEL": "warning",
        "TRUSTPLANE_KEY_ROTATION_INTERVAL": "0",
    }
    env["TRUSTPLANE_KEY_ENCRYPTION_KEY"] = cli("keys", "new-kek", env=env).strip()
    pg_name = ""
    if database_url:
        # BENCH_PG_PREFIX: helpers sharing one PostgreSQL name their scratch databases apart
        pg_name = f"{os.environ.get('BENCH_PG_PREFIX', 'tp_bench')}_{uuid.uuid4().hex[:8]}"
        asyncio.run(_create_pg_database(database_url, pg_name))
        env["TRUSTPLANE_DATABASE_URL"] = database_url.rsplit("/", 1)[0] + f"/{pg_name}"
    return env, pg_name


async def _create_pg_database(admin_url: str, name: str, drop: bool = False) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from trustplane.storage.db import async_url

    engine = create_async_engine(async_url(admin_url), isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        sql = (
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
            if drop
            else f'CREATE DATABASE "{name}"'
        )
        await conn.execute(text(sql))
    await engine.dispose()


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def bench_target(
    label: str,
    url: str,
    pid: int,
    args: argparse.Namespace,
    pem: bytes,
    client_id: str,
    issuer: str,
    work: Path,
) -> list[dict[str, float]]:
    results = []
    for rep in range(args.reps + 1):  # rep 0 warms up and is discarded
        bodies = work / f"{label}-{rep}.bodies"
        make_bodies(bodies, args.bodies, pem, client_id, issuer)
        time.sleep(args.rest)
        result = run_wrk(
            url, bodies, args.connections, args.warmup if rep == 0 else args.duration, pid
        )
        bodies.unlink()
        if rep:
            results.append(result)
            print(
                f"  {label:<10} rep {rep}: {result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.1f} ms  "
                f"p99 {result['p99_ms']:6.1f} ms  cpu {result['cpu_ms_per_req']:.3f} ms/req  "
                f"non-2xx {result['non_2xx']:.0f}",
                flush=True,
            )
    return results


def median(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--database-url", default="", help="PostgreSQL admin URL (a fresh database is made)"
    )
    ap.add_argument("--redis-url", default="", help="use Redis for the jti replay cache")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rest", type=float, default=1.0)
    ap.add_argument(
        "--bodies", type=int, default=60000, help="pre-generated requests per repetition"
    )
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json", type=Path, help="append a JSON summary line to this file")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="tp-bench-"))
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    env, pg_name = server_env(work, port, args.database_url)
    if args.redis_url:
        env["TRUSTPLANE_REDIS_URL"] = args.redis_url
    store = "postgresql" if pg_name else "sqlite"
    store += "+redis" if args.redis_url else ""
    server = baseline = None
    try:
        cli("migrate", env=env)
        cli("clients", "keygen", "--out", str(work / "client"), "--kid", "bench-key", env=env)
        client = json.loads(
            cli(
                "clients",
                "add",
                "--lei",
                "5493001KJTIIGC8Y1R12",
                "--scope",
                "order:create",
                "--resource",
                RESOURCE,
                "--jwks-file",
                str(work / "client" / "jwks.json"),
                "--name",
                "bench",
                "--json",
                env=env,
            )
        )
        pem = (work / "client" / "key.pem").read_bytes()
        server = start(
            [str(BIN / "trustplane"), "serve", "--workers", str(args.workers)],
            env,
            work / "server.log",
        )
        wait_ready(f"{issuer}/healthz")
        print(
            f"trustplane: {store}, {args.workers} worker(s), {args.connections} connections, "
            f"{args.duration}s x {args.reps}",
            flush=True,
        )
        ours = bench_target(
            "trustplane",
            f"{issuer}/token",
            server.pid,
            args,
            pem,
            client["client_id"],
            issuer,
            work,
        )
        stop(server)
        server = None
        summary = {
            "store": store,
            "workers": args.workers,
            "connections": args.connections,
            "tokens_per_s": median(ours, "rps"),
            "p50_ms": median(ours, "p50_ms"),
            "p99_ms": median(ours, "p99_ms"),
            "cpu_ms_per_token": median(ours, "cpu_ms_per_req"),
            "non_2xx": sum(r["non_2xx"] for r in ours),
        }
        if not args.no_baseline:
            bport = free_port()
            pub = work / "client" / "pub.pem"
            key = serialization.load_pem_private_key(pem, password=None)
            pub.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            benv = {**env, "BASELINE_CLIENT_PUB": str(pub), "PYTHONPATH": str(HERE)}
            baseline = start(
                [
                    str(BIN / "uvicorn"),
                    "baseline_app:app",
                    "--port",
                    str(bport),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                ],
                benv,
                work / "baseline.log",
            )
            wait_port(bport)
            base = bench_target(
                "baseline",
                f"http://127.0.0.1:{bport}/token",
                baseline.pid,
                args,
                pem,
                "baseline",
                issuer,
                work,
            )
            summary["baseline_tokens_per_s"] = median(base, "rps")
            summary["ratio_to_baseline"] = (
                summary["tokens_per_s"] / summary["baseline_tokens_per_s"]
            )
        print(json.dumps(summary, indent=2))
        if summary["non_2xx"]:
            print(f"WARNING: {summary['non_2xx']:.0f} non-2xx responses; see {work / 'server.log'}")
        if args.json:
            with args.json.open("a") as handle:
                handle.write(json.dumps(summary) + "\n")
    finally:
        for proc in (server, baseline):
            if proc is not None:
                stop(proc)
        if pg_name:
            asyncio.run(_create_pg_database(args.database_url, pg_name, drop=True))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
