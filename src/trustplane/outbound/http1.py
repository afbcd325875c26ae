"""A small HTTP/1.1 client for the guarded fetcher's GET and POST: one request at a time per
connection, kept alive, on the same guarded network streams as before
(:class:`~trustplane.outbound.connection.GuardedBackend`: the address check at every connection,
TLS against the host name), with the answer parsed by ``httptools`` (llhttp, the C parser uvicorn
serves with) instead of httpcore's pool and h11.

What it does not do, and why that is enough for these requests: no HTTP/2, no proxy, no
``Expect: 100-continue`` (an informational answer is skipped), no pipelining (an answer followed
by more bytes closes the connection), no HEAD (the fetcher sends anything but GET and POST
through httpcore). What it keeps from httpcore: the connect and per-read timeouts (and the
fetcher's total, all on one timer per request: :class:`Deadline`), the wait for a free
connection bounded by the connect timeout, idle connections dropped after
:data:`~trustplane.outbound.connection.KEEPALIVE_EXPIRY` or when the server sent anything (its
close) while they were idle, a connection never reused after an error, a cancellation or an answer
that says ``Connection: close``. The caller's checks run as soon as the head is parsed (a redirect,
a compressed body or a declared length above the cap ends the request before the body is read),
and the body is capped while it arrives.

Why: through httpcore's pool, connection and h11 layers a PDP decision cost the PEP about 0.5 ms
of client CPU (a fifth to a quarter of a reference service's CPU per call: ``bench/lifecycle.py``
with py-spy); here the request is one prepared ``bytes`` and the answer one C parser's callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Callable, Iterable

import httpcore
import httptools

from trustplane.outbound.connection import KEEPALIVE_EXPIRY
from trustplane.outbound.errors import OutboundRefused

#: Bytes asked of the stream per read.
READ_SIZE = 64 * 1024
#: The most bytes read without a complete answer head (status line and header fields,
#: informational answers included). httptools keeps a header's pieces until the field is whole and
#: has no limit of its own (the server side bounds it the same way: ``trustplane.server``), so a
#: peer sending an endless header would otherwise grow this process's memory; h11, which this
#: client replaced, refused a head over 16 KiB. 64 KiB allows long ``WWW-Authenticate`` or
#: ``Link`` fields and still bounds what a hostile peer can make us hold.
MAX_HEAD_BYTES = 64 * 1024
#: A header name is an RFC 9110 token; a value has no CR, LF or NUL (no header or request smuggled
#: into the head).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
#: Checks the caller makes on the status and headers, before the body is read (raises to refuse).
HeadCheck = Callable[[int, list[tuple[bytes, bytes]]], None]


def request_head(
    method: str, target: bytes, host: bytes, fields: Iterable[tuple[str, str]], length: int | None
) -> bytes:
    """The request line and header section as h11 writes them (``Host`` first, then
    ``Content-Length`` when there is one, then ``fields`` in order); :class:`httpcore.LocalProtocolError`
    for a name that is not a token or a value with CR, LF or NUL."""
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode("ascii"), target, host)]
    if length is not None:
        lines.append(b"Content-Length: %d\r\n" % length)
    for name, value in fields:
        if _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value) is not None:
            raise httpcore.LocalProtocolError(f"illegal header {name!r}")
        lines.append(b"%s: %s\r\n" % (name.encode("ascii"), value.encode("ascii")))
    lines.append(b"\r\n")
    return b"".join(lines)


class _Answer:
    """httptools' callbacks for one answer (informational answers skipped)."""

    __slots__ = (
        "body", "cap", "complete", "extra", "headers", "heads", "keep_alive", "parser", "size",
        "status",
    )  # fmt: skip

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.heads = 0  # final heads parsed
        self.extra = False  # anything after the final answer
        self.complete = self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    # Once the final answer is complete, whatever follows (an answer nobody asked for) is only
    # counted: the connection is then closed, never read again.

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True
        else:
            self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if not self.complete:
            self.status = self.parser.get_status_code()
            if self.status >= 200:
                self.heads += 1

    def on_body(self, chunk: bytes) -> None:
        if not self.complete:
            self.size += len(chunk)
            if self.size <= self.cap:
                self.body.append(chunk)

    def on_message_complete(self) -> None:
        if not self.complete and self.status >= 200:
            # asked now: the parser forgets the answer's Connection once it completed
            self.complete, self.keep_alive = True, self.parser.should_keep_alive()


class _Connection:
    __slots__ = ("expires", "stream")

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self.stream = stream
        self.expires = 0.0

    def usable(self, now: float) -> bool:
        """Idle, not expired, and nothing arrived while it was (the server's close, or bytes that
        belong to no request)."""
        return now < self.expires and not self.stream.get_extra_info("is_readable")


class Deadline:
    """The one timer of a request, moved from phase to phase instead of a timer per phase (an
    ``asyncio.timeout`` entered and left costs about 6 us of CPU on uvloop; the request path had
    four): it fires at the earlier of the request's end (``total`` from the start) and the current
    read's end (``read`` from when the read began); :meth:`read_expired` tells which one it was.
    :meth:`waiting` lets a phase with a timer of its own (the wait for a free connection, the
    connect) run under the total alone, so that its own timer names what was slow.

    It starts as the first read's (armed at the start, so that a request on a kept connection moves
    it never): the time before that read is the few microseconds of taking the connection."""

    __slots__ = ("_armed", "_end", "_read", "_reading", "_time", "timer")

    def __init__(self, total: float, read: float) -> None:
        self._time = asyncio.get_running_loop().time
        now = self._time()
        self._end, self._read = now + total, read
        self._reading = now + read < self._end
        self._armed = True  # the first read's window is the one set at the start
        self.timer = asyncio.timeout_at(now + read if self._reading else self._end)

    def reading(self) -> None:
        """A read begins: the timer fires ``read`` seconds from now, or at the end."""
        if self._armed:
            self._armed = False
            return
        when = self._time() + self._read
        self._reading = when < self._end
        self.timer.reschedule(when if self._reading else self._end)

    def waiting(self) -> None:
        """A phase with its own timeout begins: only the end bounds it here."""
        if self._reading:
            self._reading = False
            self.timer.reschedule(self._end)
        self._armed = False

    def read_expired(self) -> bool:
        """Whether the timer fired at a read's end (rather than the total's)."""
        return self._reading and self.timer.expired()


class Http1Pool:
    """Keep-alive connections per origin (scheme, host, port), at most ``max_connections`` in use
    at once and ``max_idle`` kept per origin."""

    def __init__(
        self,
        backend: httpcore.AsyncNetworkBackend,
        ssl_context: ssl.SSLContext,
        *,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        max_connections: int = 100,
        max_idle: int = 20,
    ) -> None:
        self._backend, self._ssl = backend, ssl_context
        self.keepalive_expiry = keepalive_expiry
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_idle
        self._idle: dict[tuple[bytes, str, int], list[_Connection]] = {}

    async def send(
        self,
        origin: tuple[bytes, str, int],
        request: bytes,
        *,
        cap: int,
        check: HeadCheck,
        connect_timeout: float,
        read_timeout: float,
        total_timeout: float,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send ``request`` (its head and body, one ``bytes``) to ``origin`` and return the final
        answer's status, headers and body. Raises what ``check`` raises,
        :class:`~trustplane.outbound.errors.OutboundRefused` ``too_large`` as soon as the body
        passes ``cap``, httpcore's exceptions (``PoolTimeout``, ``ConnectTimeout``,
        ``ReadTimeout``, connect, read and protocol errors), or :class:`TimeoutError` when
        ``total_timeout`` passed first (:class:`Deadline`)."""
        deadline = Deadline(total_timeout, read_timeout)
        try:
            async with deadline.timer:
                if self._slots.locked():
                    await self._wait_for_slot(connect_timeout, deadline)
                else:
                    await self._slots.acquire()  # free: returns at once
                try:
                    connection = await self._connection(origin, connect_timeout, deadline)
                    reusable = False
                    try:
                        answer, reusable = await self._exchange(
                            connection.stream, request, cap, check, deadline
                        )
                    finally:
                        if not (reusable and self._kept(origin, connection)):
                            await connection.stream.aclose()
                        await self._close_expired(origin)
                finally:
                    self._slots.release()
        except TimeoutError:
            if deadline.read_expired():
                raise httpcore.ReadTimeout("read timed out") from None
            raise
        return answer.status, answer.headers, b"".join(answer.body)

    async def _wait_for_slot(self, seconds: float, deadline: Deadline) -> None:
        deadline.waiting()
        try:
            async with asyncio.timeout(seconds):
                await self._slots.acquire()
        except TimeoutError:
            raise httpcore.PoolTimeout("no connection free in time") from None

    async def _connection(
        self, origin: tuple[bytes, str, int], seconds: float, deadline: Deadline
    ) -> _Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now):
                return connection
            await connection.stream.aclose()
        deadline.waiting()  # the connect's own timeouts (``seconds``) name it
        scheme, host, port = origin
        stream = await self._backend.connect_tcp(host, port, seconds)
        if scheme == b"https":
            try:
                stream = await stream.start_tls(self._ssl, server_hostname=host, timeout=seconds)
            except BaseException:
                await stream.aclose()
                raise
        return _Connection(stream)

    def _kept(self, origin: tuple[bytes, str, int], connection: _Connection) -> bool:
        """Whether ``connection`` went back to the idle ones (not when ``max_idle`` are)."""
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self._max_idle:
            return False
        connection.expires = time.monotonic() + self.keepalive_expiry
        idle.append(connection)
        return True

    async def _close_expired(self, origin: tuple[bytes, str, int]) -> None:
        """Close the origin's idle connections past their expiry (the oldest are first), as
        httpcore's pool did at each request: none is left open on our side for long."""
        idle, now = self._idle.get(origin), time.monotonic()
        while idle and idle[0].expires <= now:
            await idle.pop(0).stream.aclose()

    async def _exchange(
        self,
        stream: httpcore.AsyncNetworkStream,
        request: bytes,
        cap: int,
        check: HeadCheck,
        deadline: Deadline,
    ) -> tuple[_Answer, bool]:
        """The answer, and whether the connection may carry another request. The stream's own
        timeouts are not used (None): ``deadline`` bounds each read, the request's write with the
        first one (the write is held until that read: :class:`CoalescingStream`)."""
        # as httpcore: a server that hung up early may still have answered; read it
        with contextlib.suppress(httpcore.WriteError):
            await stream.write(request, None)
        answer = _Answer(cap)
        parser, checked, head_bytes = answer.parser, False, 0
        while not answer.complete:
            deadline.reading()
            data = await stream.read(READ_SIZE, None)
            if not data:
                if answer.heads and _until_close(answer):
                    return answer, False  # the body ended with the connection
                raise httpcore.RemoteProtocolError("the server closed the connection")
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                raise httpcore.RemoteProtocolError("an upgrade was not asked for") from None
            except httptools.HttpParserError as exc:
                if not answer.complete:
                    raise httpcore.RemoteProtocolError(f"invalid answer: {exc}") from None
                answer.extra = True  # the answer is whole; what follows it is not ours
            if not answer.heads:
                head_bytes += len(data)
                if head_bytes > MAX_HEAD_BYTES:
                    raise httpcore.RemoteProtocolError(
                        f"more than {MAX_HEAD_BYTES} bytes without a complete answer head"
                    )
            if answer.heads and not checked:
                check(answer.status, answer.headers)
                checked = True
            if answer.size > cap:
                raise OutboundRefused("too_large", f"larger than {cap} bytes")
        return answer, answer.keep_alive and not answer.extra

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.stream.aclose()


def _until_close(answer: _Answer) -> bool:
    """Whether the answer's body is delimited by the connection's close (no length, not chunked)."""
    names = {name.lower() for name, _ in answer.headers}
    return b"content-length" not in names and b"transfer-encoding" not in names
