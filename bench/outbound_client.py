#!/usr/bin/env python3
"""Client CPU per outbound call: ``AuthzenClient.decide`` (one PDP decision, ``/evaluation``) and
``RevocationCheck.is_active`` (one RFC 7662 introspection, every call a cache miss), each through the
guarded ``OutboundFetcher`` over a real loopback connection, kept alive between calls.

The server is a separate process (its CPU is not counted): a raw asyncio HTTP/1.1 server answering
a fixed AuthZEN decision, a fixed token and ``{"active": true}``. The client process measures its own
CPU (``time.process_time``) over ``-n`` sequential calls after a warm-up, and prints microseconds
per call. With ``--base DIR`` (a ``git worktree`` of an earlier commit), the runs alternate between
this tree's ``src`` and ``DIR/src`` on ``PYTHONPATH`` (new, old, old, new, ...), each run a fresh
process, and the medians are printed per tree.

  python bench/outbound_client.py -n 3000
  python bench/outbound_client.py --base /tmp/old-outb --reps 3 -n 3000
  python bench/outbound_client.py --loop asyncio --what decide
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DECISION = (
    b'{"decision":true,"context":{"decision_id":"0f6c7c2e9d8b4a51a1c3e2f4b5d6a7c8",'
    b'"reason_ids":["trade.owner_may_confirm"],"bundle_version":"v1"}}'
)
TOKEN = b'{"access_token":"tok-1","token_type":"Bearer","expires_in":3600}'
ACTIVE = b'{"active":true}'


# --------------------------------------------------------------------------- the server


async def serve(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, _, rest = head.partition(b"\r\n")
                length = 0
                for field in rest.split(b"\r\n"):
                    name, _, value = field.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                path = line.split(b" ")[1]
                body = (
                    TOKEN if path == b"/token" else ACTIVE if path == b"/introspect" else DECISION
                )
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------- the client


async def measure(port: int, what: str, n: int, warmup: int) -> dict[str, float]:
    from trustplane.authzen.model import Entity
    from trustplane.outbound import OutboundFetcher, OutboundPolicy
    from trustplane.pep import AuthzenClient, ClientSecretBasic
    from trustplane.pep.introspection import RevocationCheck

    base = f"http://127.0.0.1:{port}"
    fetcher = OutboundFetcher(OutboundPolicy.development(rate_per_host=0.0))
    auth = ClientSecretBasic("settlement-service", "secret")
    results: dict[str, float] = {}
    if what in ("decide", "both"):
        client = AuthzenClient(base, token_endpoint=f"{base}/token", auth=auth, fetcher=fetcher)
        owner = Entity("LegalEntity", "LEI-5493001KJTIIGC8Y1R12")
        subject = Entity("Client", "settlement-service", {"legal_entity": owner, "scopes": ["t"]})
        trade = Entity("Trade", "T-000123", {"owner": owner, "state": "matched", "amount": 1250})
        context = {"transition": "confirm", "service": "settlement", "amount": 1250}

        async def decide(i: int) -> None:
            decision = await client.decide(
                subject, "trade:confirm", trade, context, correlation_id=f"req-{i}"
            )
            assert decision.allowed, decision

        results["decide_us"] = await _timed(decide, n, warmup)
    if what in ("introspect", "both"):
        check = RevocationCheck(f"{base}/introspect", auth, fetcher, ttl=0.0)
        exp = int(time.time()) + 3600

        async def introspect(i: int) -> None:
            assert await check.is_active("eyJ.token.sig", f"jti-{i}", exp)

        results["introspect_us"] = await _timed(introspect, n, warmup)
    await fetcher.aclose()
    return results


async def _timed(call: Any, n: int, warmup: int) -> float:
    for i in range(warmup):
        await call(-i - 1)
    start = time.process_time()
    for i in range(n):
        await call(i)
    return (time.process_time() - start) / max(n, 1) * 1e6  # -n 0: a callgrind baseline


def child(args: argparse.Namespace) -> None:
    if args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    print(json.dumps(runner(measure(args.port, args.what, args.n, args.warmup))), flush=True)


# --------------------------------------------------------------------------- the driver


def run_child(src: Path, args: argparse.Namespace, port: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, __file__, "--child", "--port", str(port), "-n", str(args.n)]
    command += ["--warmup", str(args.warmup), "--loop", args.loop, "--what", args.what]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="timed calls per run")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3, help="runs per tree")
    parser.add_argument("--base", type=Path, help="a baseline tree to alternate with")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--what", choices=["decide", "introspect", "both"], default="both")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.port))
        return
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(HERE))
    from _common import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    server.stdout.readline()
    trees = {"new": HERE.parent / "src"}
    if args.base is not None:
        trees["old"] = args.base.resolve() / "src"
    order = list(trees)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        for rep in range(args.reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                result = run_child(trees[name], args, port)
                runs[name].append(result)
                load = os.getloadavg()[0]
                figures = "  ".join(f"{k} {v:7.1f}" for k, v in result.items())
                print(f"rep {rep} {name:3}  {figures}  load {load:.2f}", flush=True)
    finally:
        server.terminate()
        server.wait()
    for name, results in runs.items():
        keys = results[0].keys()
        medians = "  ".join(f"{k} {statistics.median(r[k] for r in results):7.1f}" for k in keys)
        ranges = "  ".join(
            f"{k} {min(r[k] for r in results):.0f}-{max(r[k] for r in results):.0f}" for k in keys
        )
        print(f"median {name:3}  {medians}   (range {ranges})")


if __name__ == "__main__":
    main()
