#!/usr/bin/env python3
"""What the HTTP layer costs per response: uvicorn with trustplane's protocol class
(``trustplane.server.BoundedHttpToolsProtocol``) serving a fixed token-sized JSON answer, this tree
against a baseline tree, alternated, one process each, wrk on loopback. Server CPU per response is
the process's CPU time over the responses; the app does nothing else, so a difference between the
trees is the protocol's own (e.g. one ``write`` per response instead of two).

  python bench/hotpath_response.py --base /tmp/token-base --reps 5
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port
from token_endpoint import TICK, process_tree_ticks, start, stop, wait_port

OURS = Path(__file__).resolve().parent.parent
SERVER = """
import asyncio, uvicorn, uvloop
from trustplane.server import BoundedHttpToolsProtocol
BODY = b'{"access_token":"' + b"x" * 620 + b'","token_type":"Bearer","expires_in":300,"scope":"order:create"}'
HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
           (b"pragma", b"no-cache"), (b"content-length", str(len(BODY)).encode())]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, port=int(__import__("sys").argv[1]), http=BoundedHttpToolsProtocol,
            log_level="warning", access_log=False, server_header=False, lifespan="off")
"""


def write_calls(pid: int) -> int:
    """The process's write system calls so far (``syscw``: uvloop writes a socket with ``write``)."""
    with open(f"/proc/{pid}/io") as handle:
        return int(next(line for line in handle if line.startswith("syscw:")).split()[1])


def wrk(port: int, connections: int, duration: int) -> int:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"http://127.0.0.1:{port}/token"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.gettempdir())
    servers = {}
    try:
        for name, tree in (("ours", OURS), ("base", args.base.resolve())):
            port = free_port()
            env = {**os.environ, "PYTHONPATH": str(tree / "src")}
            proc = start(
                [sys.executable, "-c", SERVER, str(port)], env, work / f"tp-resp-{name}.log"
            )
            wait_port(port)
            wrk(port, args.connections, 1)  # warm-up
            servers[name] = (port, proc)
        results: dict[str, list[float]] = {name: [] for name in servers}
        writes: dict[str, list[float]] = {name: [] for name in servers}
        for rep in range(args.reps):
            for name in list(servers) if rep % 2 else list(servers)[::-1]:
                port, proc = servers[name]
                time.sleep(0.5)
                before, load = process_tree_ticks(proc.pid), os.getloadavg()[0]
                calls = write_calls(proc.pid)
                n = wrk(port, args.connections, args.duration)
                us = 1e6 * (process_tree_ticks(proc.pid) - before) / TICK / n
                results[name].append(us)
                writes[name].append((write_calls(proc.pid) - calls) / n)
                print(f"  {name} rep {rep + 1}: {n / args.duration:8.0f} responses/s  "
                      f"{us:6.1f} us CPU per response  {writes[name][-1]:.2f} write calls "
                      f"per response  load {load:.2f}", flush=True)  # fmt: skip
        for name, values in results.items():
            print(f"{name}: median {statistics.median(values):.1f} us CPU per response "
                  f"({', '.join(f'{v:.1f}' for v in values)}), "
                  f"{statistics.median(writes[name]):.2f} write calls per response")  # fmt: skip
    finally:
        for _, proc in servers.values():
            stop(proc)


if __name__ == "__main__":
    main()
