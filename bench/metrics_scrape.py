#!/usr/bin/env python3
"""Cost of a ``/metrics`` scrape on the operations listener with 1 and with N workers.

With several workers the counters live in prometheus_client's multiprocess files and a scrape merges
every worker's file (``trustplane.metrics.exposition``); with one worker the default registry is
written directly. For each worker count: start a real ``trustplane serve --workers N`` (SQLite),
send --warm requests that touch many labelled series (refused token requests, JWKS, metadata,
404s), then scrape /metrics --scrapes times one after another and report the server time per scrape
as seen by the client (p50/p95/max, ms) and the size of the answer.

  python bench/metrics_scrape.py                 # 1 and 4 workers
  python bench/metrics_scrape.py --workers 1 2 4 8 --scrapes 200
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, wait_ready

BIN = Path(sys.executable).parent
ERRORS = ("invalid_client", "unsupported_grant_type", "invalid_request")


def _warm(base: str, count: int) -> None:
    def one(i: int) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:  # a new connection: any worker
            grant = ("client_credentials", "nonsense", "")[i % 3]
            client.post("/token", data={"grant_type": grant} if grant else {})
            client.get("/jwks")
            client.get("/.well-known/oauth-authorization-server")
            client.get(f"/no-such-page-{i % 5}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def _measure(workers: int, args: argparse.Namespace, work: Path) -> dict[str, float]:
    port, ops = free_port(), free_port()
    env = {
        **os.environ,
        "TRUSTPLANE_DATA_DIR": str(work / f"data-{workers}"),
        "TRUSTPLANE_PORT": str(port),
        "TRUSTPLANE_OPS_PORT": str(ops),
        "TRUSTPLANE_WORKERS": str(workers),
        "TRUSTPLANE_LOG_LEVEL": "warning",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(work / f"server-{workers}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [str(BIN / "trustplane"), "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", timeout=120)
        _warm(f"http://127.0.0.1:{port}", args.warm)
        times: list[float] = []
        size = 0
        with httpx.Client(timeout=30) as client:
            client.get(f"http://127.0.0.1:{ops}/metrics")  # first scrape: connection, imports
            for _ in range(args.scrapes):
                started = time.perf_counter()
                body = client.get(f"http://127.0.0.1:{ops}/metrics").content
                times.append((time.perf_counter() - started) * 1000)
                size = len(body)
        times.sort()
        return {
            "workers": workers,
            "scrapes": len(times),
            "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
            "max_ms": round(times[-1], 2),
            "bytes": size,
            "files": len(list((work / f"data-{workers}" / "metrics").glob("run-*/*.db"))),
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--scrapes", type=int, default=100)
    ap.add_argument("--warm", type=int, default=300, help="requests before scraping")
    ap.add_argument("--json", type=Path, help="append one JSON line per worker count")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tp-metrics-bench-") as tmp:
        for workers in args.workers:
            result = _measure(workers, args, Path(tmp))
            print(json.dumps(result))
            if args.json:
                with args.json.open("a") as out:
                    out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
