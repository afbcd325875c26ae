"""An open-loop load generator: token requests at a fixed arrival rate (wrk2-style), whatever the
server's latency, over a pool of keep-alive HTTP/1.1 connections spoken directly on asyncio streams
(a few tens of microseconds of client CPU per request, so the generator leaves the cores to the
servers). Latency runs from each request's scheduled start, not from when a connection became free,
so queueing under overload shows up in it (no coordinated omission).

Bodies are client_credentials requests with a fresh ES256 client assertion each (single-use ``jti``),
signed one second ahead in a worker process: assertions stay well inside their lifetime however long
the run.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_SIGNER = None
_ARGS: dict[str, str] = {}


def _init(pem: bytes, args: dict[str, str]) -> None:
    global _SIGNER
    from trustplane.jose.jws import Signer

    key = serialization.load_pem_private_key(pem, password=None)
    _SIGNER = Signer(key, "ES256", "bench-key", typ="JWT")  # type: ignore[arg-type]
    _ARGS.update(args)


def _bodies(first: int, n: int) -> list[bytes]:
    now, a, out = int(time.time()), _ARGS, []
    for i in range(first, first + n):
        claims = {"iss": a["client_id"], "sub": a["client_id"], "aud": a["issuer"], "iat": now,
                  "exp": now + 120, "jti": f"{a['prefix']}-{i}"}  # fmt: skip
        form = {"grant_type": "client_credentials", "scope": "order:create",
                "resource": a["resource"], "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": _SIGNER.sign(claims)}  # type: ignore[union-attr]  # fmt: skip
        body = urlencode(form).encode()
        out.append(
            b"POST /token HTTP/1.1\r\nHost: " + a["host"].encode()
            + b"\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip
    return out


@dataclass
class Sample:
    at: float  # seconds since the start, scheduled
    latency: float  # seconds from the scheduled start to the full response
    status: int  # 0: transport error


@dataclass
class OpenLoop:
    host: str
    port: int
    rate: float
    pem: bytes
    client_id: str
    issuer: str
    resource: str
    max_connections: int = 512
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _idle: collections.deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(
        default_factory=collections.deque
    )
    _open: int = 0

    async def run(self, seconds: float) -> None:
        args = {"client_id": self.client_id, "issuer": self.issuer, "resource": self.resource,
                "host": f"{self.host}:{self.port}", "prefix": uuid.uuid4().hex[:12]}  # fmt: skip
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.max_connections)
        per_second = max(1, round(self.rate))
        with concurrent.futures.ProcessPoolExecutor(
            1, initializer=_init, initargs=(self.pem, args)
        ) as pool:
            ahead = loop.run_in_executor(pool, _bodies, 0, per_second)
            buffer: collections.deque[bytes] = collections.deque()
            start, sent, tasks = time.monotonic(), 0, set()
            total = int(seconds * self.rate)
            while sent < total:
                if len(buffer) < per_second // 2 + 1:
                    buffer.extend(await ahead)
                    ahead = loop.run_in_executor(pool, _bodies, sent + len(buffer), per_second)
                due = min(total, int((time.monotonic() - start) * self.rate) + 1)
                while sent < due and buffer:
                    at = sent / self.rate
                    task = asyncio.create_task(self._one(buffer.popleft(), start, at, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                next_at = sent / self.rate
                await asyncio.sleep(max(0.0, start + next_at - time.monotonic()))
            await asyncio.gather(*tasks)
            ahead.cancel()
        while self._idle:
            self._idle.popleft()[1].close()

    async def _one(self, request: bytes, start: float, at: float, slots: asyncio.Semaphore) -> None:
        async with slots:
            try:
                status = await self._send(request)
            except Exception as exc:  # every failure is a counted error
                status = 0
                self.errors.append(f"{at:.1f}s {exc!r}")
            if status != 200 and status:
                self.errors.append(f"{at:.1f}s HTTP {status}")
            self.samples.append(Sample(at, time.monotonic() - start - at, status))

    async def _send(self, request: bytes) -> int:
        if self._idle:
            reader, writer = self._idle.popleft()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length:
            await reader.readexactly(length)
        if close:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status
