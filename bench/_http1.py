"""A small keep-alive HTTP/1.1 client on asyncio protocols, for load generators (``bench/lifecycle.py``).

A benchmark driver on the same machine as the servers it measures takes CPU from them: httpx spent
about 3-4 ms of CPU per request in the lifecycle bench (its pool, its request and response models, its
header handling and the anyio layers), as much as a server spent answering. This client does only what
a load generator needs: the caller passes the request already serialised (head and body as bytes), the
client writes it on a pooled connection and reads the answer (status, raw head, body by
``Content-Length`` or chunked); nothing is parsed beyond that. What it does not do: TLS, redirects,
proxies, ``Expect: 100-continue``, HTTP/2, or any retry (a failed request is an error for the caller
to count, as with httpx).

Connections idle longer than ``idle`` seconds are closed instead of reused: the server closes its
side after its keep-alive timeout (uvicorn: 5 s), and reusing a connection just before that races the
close (``bench/lifecycle.py``, ``CLIENT_IDLE``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


class HttpError(Exception):
    """The request got no (complete) answer: the connection failed, was closed, or timed out."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    head: bytes  # the status line and headers, as received
    body: bytes

    def header(self, name: str) -> str | None:
        """A header's value (the first one), or None. Parses the head: not for the timed path."""
        wanted = name.lower().encode("latin-1")
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == wanted:
                return value.strip().decode("latin-1")
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _Connection(asyncio.Protocol):
    """One connection; one request at a time. The answer is parsed when enough bytes are in."""

    __slots__ = ("_head_end", "_need", "buffer", "closed", "idle_since", "transport", "waiter")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._need = -1  # the complete answer's length once its head is parsed; -2: chunked
        self._head_end = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            detail = f": {type(exc).__name__}: {exc}" if exc else ""
            waiter.set_exception(HttpError(f"the server closed the connection{detail}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            answer = self._answer()
        except HttpError as exc:
            waiter.set_exception(exc)
            return
        if answer is not None:
            waiter.set_result(answer)

    def send(self, request: bytes, waiter: asyncio.Future[Answer]) -> None:
        self.buffer.clear()
        self._need = self._head_end = -1
        self.waiter = waiter
        assert self.transport is not None
        self.transport.write(request)

    def _answer(self) -> Answer | None:
        buffer = self.buffer
        if self._head_end < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return None
            self._head_end = end + 4
            head = bytes(buffer[:end])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                self._need = self._head_end + int(lower[at + 17 : stop if stop > 0 else None])
            elif b"\r\ntransfer-encoding: chunked" in lower:
                self._need = -2
            elif lower[9:12] in (b"204", b"304"):  # no body (RFC 9112 section 6.3)
                self._need = self._head_end
            else:
                raise HttpError("an answer with neither Content-Length nor chunked encoding")
            if b"\r\nconnection: close" in lower:
                self.closed = True
        if self._need >= 0:
            if len(buffer) < self._need:
                return None
            return self._done(bytes(buffer[self._head_end : self._need]))
        body = _dechunk(buffer, self._head_end)
        return None if body is None else self._done(body)

    def _done(self, body: bytes) -> Answer:
        head = bytes(self.buffer[: self._head_end - 4])
        self.waiter = None
        return Answer(int(head[9:12]), head, body)


def _dechunk(buffer: bytearray, at: int) -> bytes | None:
    """The body of a complete chunked answer, None while incomplete (trailers are ignored)."""
    parts: list[bytes] = []
    while True:
        eol = buffer.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(bytes(buffer[at:eol]).split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(parts) if buffer.find(b"\r\n\r\n", eol) >= 0 else None
        start, at = eol + 2, eol + 2 + size + 2
        if len(buffer) < at:
            return None
        parts.append(bytes(buffer[start : at - 2]))


class Pool:
    """Keep-alive connections per origin (``http://host:port``), most recently used first."""

    def __init__(self, *, idle: float, timeout: float) -> None:
        self._idle = idle
        self._timeout = timeout
        self._free: dict[tuple[str, int], list[_Connection]] = {}

    async def request(self, origin: tuple[str, int], request: bytes) -> Answer:
        """Send ``request`` (a complete HTTP/1.1 request: head and body) and read the answer."""
        loop = asyncio.get_running_loop()
        connection = await self._connection(loop, origin)
        waiter: asyncio.Future[Answer] = loop.create_future()
        timer = loop.call_later(self._timeout, _expire, waiter, self._timeout)
        try:
            connection.send(request, waiter)
            answer = await waiter
        except BaseException:
            connection.closed = True
            if connection.transport is not None:
                connection.transport.close()
            raise
        finally:
            timer.cancel()
        if not connection.closed:
            connection.idle_since = time.monotonic()
            self._free.setdefault(origin, []).append(connection)
        elif connection.transport is not None:
            connection.transport.close()
        return answer

    async def _connection(
        self, loop: asyncio.AbstractEventLoop, origin: tuple[str, int]
    ) -> _Connection:
        free = self._free.get(origin)
        if free:
            now = time.monotonic()
            while free:
                connection = free.pop()
                if not connection.closed and now - connection.idle_since < self._idle:
                    return connection
                if connection.transport is not None:
                    connection.transport.close()
        try:
            _, connection = await loop.create_connection(_Connection, *origin)
        except OSError as exc:
            raise HttpError(f"connect to {origin[0]}:{origin[1]}: {exc}") from exc
        return connection

    def close(self) -> None:
        for free in self._free.values():
            for connection in free:
                if connection.transport is not None:
                    connection.transport.close()
        self._free.clear()


def _expire(waiter: asyncio.Future[Answer], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(HttpError(f"no answer within {timeout:g} s"))


def origin_of(url: str) -> tuple[tuple[str, int], str, str]:
    """``http://host:port/path`` -> ((host, port), the Host header's value, the path)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http:// URLs: {url}")
    port = parts.port or 80
    return (parts.hostname, port), parts.netloc, parts.path or "/"


def post(host: str, path: str, headers: str, body: bytes, content_type: str) -> bytes:
    """A POST request's bytes: ``headers`` is extra header lines, each ending with CRLF."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body
