"""The guarded fetcher's own HTTP/1.1 client (``trustplane.outbound.http1``): framing of answers
(length, chunked, until close, informational answers), when a connection is kept and when it is
not, and the head it writes. Each server here is a scripted loopback socket: it reads a request
and writes the bytes the test gives it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import pytest

from trustplane.outbound import OutboundError, OutboundFetcher, OutboundPolicy, OutboundRefused
from trustplane.outbound.connection import AsyncioBackend, GuardedBackend
from trustplane.outbound.http1 import request_head


@dataclass
class Scripted:
    """Answers the n-th request of the server with ``answers[n]``; closes after it if the answer
    is in ``close_after``."""

    answers: list[bytes]
    close_after: set[int] = field(default_factory=set)
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/doc"


class _Servers:
    """The loopback servers a fixture started: each on a free port (set on its state), all closed
    at the end of the test."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []

    async def listen(
        self,
        state: Scripted,
        handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> Scripted:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self._servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[Scripted]]]:
    servers = _Servers()

    async def start(answers: list[bytes], close_after: set[int] | None = None) -> Scripted:
        state = Scripted(answers, close_after or set())

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                while len(state.requests) < len(state.answers):
                    state.requests.append(await reader.readuntil(b"\r\n\r\n"))
                    n = len(state.requests) - 1
                    writer.write(state.answers[n])
                    await writer.drain()
                    if n in state.close_after:
                        break
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        return await servers.listen(state, handle)

    yield start
    await servers.close()


def fetcher() -> OutboundFetcher:
    return OutboundFetcher(OutboundPolicy.development(max_bytes=1024))


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"


async def test_a_chunked_answer_is_read_whole(scripted: Callable[..., Awaitable[Scripted]]) -> None:
    body = (
        b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n'
    )
    server = await scripted([body, OK])
    client = fetcher()
    assert await client.get_json(server.url, purpose="t") == {"a": 1}
    assert await client.get_json(server.url, purpose="t") == {}
    await client.aclose()
    assert server.connections == 1  # kept alive after a chunked answer


async def test_a_body_without_length_ends_with_the_connection(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await scripted([b'HTTP/1.1 200 OK\r\n\r\n{"b": 2}', OK], close_after={0})
    client = fetcher()
    assert await client.get_json(server.url, purpose="t") == {"b": 2}
    assert await client.get_json(server.url, purpose="t") == {}
    await client.aclose()
    assert server.connections == 2


async def test_an_informational_answer_is_skipped(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n"
    server = await scripted([early + OK])
    client = fetcher()
    fetched = await client.request("POST", server.url, purpose="t", content=b"x")
    await client.aclose()
    assert (fetched.status, fetched.body) == (200, b"{}")


async def test_connection_close_is_honoured(scripted: Callable[..., Awaitable[Scripted]]) -> None:
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
    server = await scripted([closing, OK], close_after={0})
    client = fetcher()
    for _ in range(2):
        assert await client.get_json(server.url, purpose="t") == {}
    await client.aclose()
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    """No ``Connection: close``, but the server hangs up after answering: the next request opens
    a new connection instead of failing on the closed one."""
    server = await scripted([OK, OK], close_after={0})
    client = fetcher()
    assert await client.get_json(server.url, purpose="t") == {}
    await asyncio.sleep(0.05)  # the close arrives while the connection is idle
    assert await client.get_json(server.url, purpose="t") == {}
    await client.aclose()
    assert server.connections == 2


async def test_bytes_after_an_answer_close_the_connection(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    """An answer followed by more than it (a second, unasked answer) is never reused: the extra
    bytes would be taken for the next request's answer."""
    server = await scripted([OK + OK, OK])
    client = fetcher()
    for _ in range(2):
        assert await client.get_json(server.url, purpose="t") == {}
    await client.aclose()
    assert server.connections == 2


async def test_a_chunked_body_is_abandoned_past_the_cap(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    chunk = b"400\r\n" + b" " * 1024 + b"\r\n"
    server = await scripted([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk * 3])
    client = fetcher()
    with pytest.raises(OutboundRefused) as refused:
        await client.get_json(server.url, purpose="t")
    await client.aclose()
    assert refused.value.outcome == "too_large"


async def test_a_malformed_answer_is_an_error(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await scripted([b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n{}"])
    client = fetcher()
    with pytest.raises(OutboundError) as failed:
        await client.get_json(server.url, purpose="t")
    await client.aclose()
    assert failed.value.outcome == "error"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nx-long: " + b"a" * 200_000 + b"\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\n" + b"x-many: a\r\n" * 20_000 + b"content-length: 2\r\n\r\n{}",
        b"HTTP/1.1 100 Continue\r\n" + b"x-info: a\r\n" * 20_000 + b"\r\n" + OK,
    ],
    ids=["long-field", "many-fields", "informational"],
)
async def test_an_answer_head_past_the_bound_is_an_error(
    scripted: Callable[..., Awaitable[Scripted]], head: bytes
) -> None:
    """httptools keeps a header's pieces without limit: the client stops reading a head past
    MAX_HEAD_BYTES (as h11 did at 16 KiB) instead of holding whatever the peer sends."""
    server = await scripted([head])
    client = fetcher()
    with pytest.raises(OutboundError) as failed:
        await client.get_json(server.url, purpose="t")
    await client.aclose()
    assert failed.value.outcome == "error"
    assert "without a complete answer head" in str(failed.value)


async def test_a_head_within_the_bound_is_read(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    head = b"HTTP/1.1 200 OK\r\nx-long: " + b"a" * 40_000 + b"\r\ncontent-length: 2\r\n\r\n{}"
    server = await scripted([head])
    client = fetcher()
    assert await client.get_json(server.url, purpose="t") == {}
    await client.aclose()


@pytest.mark.parametrize(
    ("name", "value"),
    [("X-Id", "a\r\nX-Injected: 1"), ("X-Id", "a\nb"), ("X-Id", "a\x00"), ("X Id", "a"), ("", "a")],
)
async def test_a_header_that_would_break_the_head_is_refused_before_sending(
    scripted: Callable[..., Awaitable[Scripted]], name: str, value: str
) -> None:
    server = await scripted([OK])
    client = fetcher()
    with pytest.raises(OutboundError) as failed:
        await client.request("GET", server.url, purpose="t", headers={name: value})
    await client.aclose()
    assert failed.value.outcome == "error"
    assert server.requests == []


def test_the_head_is_written_as_h11_writes_it() -> None:
    head = request_head("POST", b"/a?b=1", b"pdp.example", [("Accept", "*/*")], 3)
    assert head == (
        b"POST /a?b=1 HTTP/1.1\r\nHost: pdp.example\r\nContent-Length: 3\r\nAccept: */*\r\n\r\n"
    )


async def test_idle_connections_past_their_expiry_are_closed(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    """Two connections opened at once (A, B); B reused later, so that A expires while B does
    not: the request on B closes A (the server sees it end) rather than leaving it open until the
    pool would reach it."""
    server = await scripted([OK, OK, OK, OK])
    client = fetcher()
    pool = client._http1
    assert pool is not None
    pool.keepalive_expiry = 1.0
    await asyncio.gather(*(client.get_json(server.url, purpose="t") for _ in range(2)))
    idle = pool._idle[(b"http", "127.0.0.1", server.port)]
    _first, second = idle
    await asyncio.sleep(0.6)
    assert await client.get_json(server.url, purpose="t") == {}  # on B: B kept until ~1.6 s
    await asyncio.sleep(0.6)  # A (expired at ~1.0 s) is idle; B is not expired
    assert await client.get_json(server.url, purpose="t") == {}
    assert idle == [second]
    assert server.connections == 2
    await client.aclose()


# --------------------------------------------------------------------------- one timer per request
# The client bounds a request with one timer (http1.Deadline), moved from phase to phase; each
# test below fails on a timer that is not moved where it must be.


@pytest.fixture
async def paced() -> AsyncIterator[Callable[..., Awaitable[Scripted]]]:
    """A server that answers each request with ``pieces``, sleeping ``gap`` seconds before each."""
    servers = _Servers()

    async def start(pieces: list[bytes], gap: float) -> Scripted:
        state = Scripted([b"".join(pieces)])

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                while True:
                    state.requests.append(await reader.readuntil(b"\r\n\r\n"))
                    for piece in pieces:
                        await asyncio.sleep(gap)
                        writer.write(piece)
                        await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        return await servers.listen(state, handle)

    yield start
    await servers.close()


def _failure(policy: OutboundPolicy, **kw: Any) -> Callable[[str], Awaitable[tuple[str, str]]]:
    async def fetch(url: str) -> tuple[str, str]:
        client = OutboundFetcher(policy, **kw)
        try:
            await client.get_json(url, purpose="t")
        except OutboundError as exc:
            return exc.outcome, exc.reason
        finally:
            await client.aclose()
        return "ok", ""

    return fetch


async def test_the_read_timeout_bounds_each_read_not_the_whole_answer(
    paced: Callable[..., Awaitable[Scripted]],
) -> None:
    """The answer in 5-byte pieces 0.1 s apart (0.8 s in all) under a 0.4 s read timeout: every
    read is quick, and the total (10 s) is far."""
    pieces = [OK[i : i + 5] for i in range(0, len(OK), 5)]
    assert len(pieces) == 8
    server = await paced(pieces, 0.1)
    policy = OutboundPolicy.development(read_timeout=0.4, total_timeout=10.0)
    assert await _failure(policy)(server.url) == ("ok", "")


async def test_the_read_timeout_and_the_total_each_name_themselves(
    paced: Callable[..., Awaitable[Scripted]],
) -> None:
    slow = await paced([OK], 5.0)
    read = OutboundPolicy.development(read_timeout=0.2, total_timeout=10.0)
    assert await _failure(read)(slow.url) == ("timeout", "ReadTimeout")
    total = OutboundPolicy.development(read_timeout=5.0, total_timeout=0.2)
    assert await _failure(total)(slow.url) == ("timeout", "no answer in time")
    # each piece within the read timeout, the whole past the total
    trickle = await paced([OK[i : i + 1] for i in range(len(OK))], 0.05)
    both = OutboundPolicy.development(read_timeout=0.3, total_timeout=0.5)
    assert await _failure(both)(trickle.url) == ("timeout", "no answer in time")


class _SlowConnect(AsyncioBackend):
    """Connects after ``delay`` seconds, or raises ``ConnectTimeout`` when its timeout is shorter."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        *args: Any,
        **kw: Any,
    ) -> httpcore.AsyncNetworkStream:
        if timeout is not None and timeout < self.delay:
            await asyncio.sleep(timeout)
            raise httpcore.ConnectTimeout("connect timed out")
        await asyncio.sleep(self.delay)
        return await super().connect_tcp(host, port, timeout, *args, **kw)


class _HangingResolver:
    async def __call__(self, host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        return []


async def test_a_connect_longer_than_the_read_timeout_is_not_a_read_timeout(
    scripted: Callable[..., Awaitable[Scripted]],
) -> None:
    """The connect runs under its own timeout (and the total), not the read's."""
    server = await scripted([OK])
    policy = OutboundPolicy.development(read_timeout=0.1, connect_timeout=3.0)
    backend = GuardedBackend(allow_loopback=True, inner=_SlowConnect(0.4))
    assert await _failure(policy, backend=backend)(server.url) == ("ok", "")


async def test_a_connect_timeout_names_itself() -> None:
    """A name that does not resolve in time: ``ConnectTimeout``, even with a shorter read
    timeout and a longer total."""
    policy = OutboundPolicy(read_timeout=0.05, connect_timeout=0.3, total_timeout=10.0)
    backend = GuardedBackend(_HangingResolver())
    fetch = _failure(policy, backend=backend)
    assert await fetch("https://pdp.partner.test/evaluation") == ("timeout", "ConnectTimeout")


async def test_the_wait_for_a_free_connection_is_bounded_by_the_connect_timeout(
    paced: Callable[..., Awaitable[Scripted]],
) -> None:
    """One connection allowed; the first request holds it 1 s (the server's pause), and the
    second, sent 0.05 s later, waits for it under the connect timeout, then reads under the read
    timeout (1.5 s): its wait and its read together (about 2 s) are not one read."""
    server = await paced([OK], 1.0)

    async def two(connect_timeout: float) -> list[tuple[str, str]]:
        policy = OutboundPolicy.development(read_timeout=1.5, connect_timeout=connect_timeout)
        client = OutboundFetcher(policy)
        assert client._http1 is not None
        client._http1._slots = asyncio.Semaphore(1)
        outcomes: list[tuple[str, str]] = []

        async def one(delay: float) -> None:
            await asyncio.sleep(delay)
            try:
                await client.get_json(server.url, purpose="t")
                outcomes.append(("ok", ""))
            except OutboundError as exc:
                outcomes.append((exc.outcome, exc.reason))

        await asyncio.gather(one(0.0), one(0.05))
        await client.aclose()
        return outcomes

    assert await two(3.0) == [("ok", ""), ("ok", "")]
    assert await two(0.3) == [("timeout", "PoolTimeout"), ("ok", "")]
