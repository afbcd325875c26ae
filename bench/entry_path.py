#!/usr/bin/env python3
"""CPU per request of the layers an AuthZEN request crosses before its handler decides, in process
(issue 15): ``Listeners`` -> ``TrustplaneApp`` (size limits, routing) -> the fast route's ASGI
adapter -> what every guarded handler reads first (``bearer_guard.http.bearer_request``: the
``Authorization`` header; the body), then a fixed 200 answer. The headers are wrk's and a PEP's
(``bench/authzen.lua``). No network and no decision: what is left is the entry's own cost.

  PYTHONPATH=$TREE/src python bench/entry_path.py [-n 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from trustplane.app import TrustplaneApp
from trustplane.bearer_guard.http import bearer_request
from trustplane.limits import RequestLimits
from trustplane.server import Listeners

BODY = (
    b'{"subject":{"type":"client","id":"pep"},"action":{"name":"order:create"},' + b"x" * 300 + b"}"
)
HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"authorization", b"Bearer " + b"e" * 600),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
]


async def endpoint(request: Request) -> Response:
    bearer = bearer_request(request)
    body = await request.body()
    assert bearer.authorization
    assert body
    return Response(b'{"decision":true}', media_type="application/json")


async def measure(n: int) -> float:
    limits = RequestLimits(route_caps=(("/access/v1/evaluation", 1 << 20),))
    app = TrustplaneApp(
        FastAPI(), [Route("/access/v1/evaluation", endpoint, methods=["POST"])], limits
    )
    entry = Listeners(app, None, 0)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    def scope() -> dict[str, Any]:  # as uvicorn's httptools protocol makes it
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
            "scheme": "http", "root_path": "", "headers": list(HEADERS), "state": {},
            "method": "POST", "path": "/access/v1/evaluation", "raw_path": b"/access/v1/evaluation",
            "query_string": b"",
        }  # fmt: skip

    for _ in range(1000):
        await entry(scope(), receive, send)
    sent.clear()
    started = time.process_time()
    for _ in range(n):
        await entry(scope(), receive, send)
    elapsed = time.process_time() - started
    assert len(sent) == 2 * n
    assert sent[0]["status"] == 200
    return elapsed / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    runs = [asyncio.run(measure(args.n)) for _ in range(args.repeat)]
    print(f"entry path: {min(runs):.2f} us CPU/request (min of {args.repeat}; all "
          f"{', '.join(f'{r:.2f}' for r in runs)}), load {os.getloadavg()[0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
