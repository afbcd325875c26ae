"""``bench/_http1.py``, the lifecycle bench's HTTP/1.1 client: answers read whole however the bytes
arrive (``Content-Length`` or chunked, split anywhere), connections reused while fresh and replaced
when idle too long or closed, and a request without an answer an error (never a hang)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _http1 import HttpError, Pool, origin_of, post

Answerer = Callable[[bytes], list[bytes]]


async def _serve(answer: Answerer) -> tuple[asyncio.Server, list[int]]:
    """A server that reads one request head (and its Content-Length body) at a time and writes
    ``answer(request)`` in the pieces given; ``connections`` counts the accepted ones. An empty
    list of pieces closes the connection."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                pieces = answer(request)
                if not pieces:
                    break
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, connections


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    p = Pool(idle=5.0, timeout=2.0)
    yield p
    p.close()


def _origin(server: asyncio.Server) -> tuple[str, int]:
    return ("127.0.0.1", server.sockets[0].getsockname()[1])


async def test_an_answer_split_anywhere_is_read_whole_and_the_connection_reused(pool: Pool) -> None:
    def answer(request: bytes) -> list[bytes]:
        body = request.split(b"\r\n\r\n", 1)[1]
        whole = b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\nX-A: b\r\n\r\n%s" % (
            len(body),
            body,
        )
        return [whole[:5], whole[5:30], whole[30:]]

    server, connections = await _serve(answer)
    origin, host, path = origin_of(f"http://127.0.0.1:{_origin(server)[1]}/orders")
    for body in (b'{"n": 1}', b'{"n": 22}'):
        got = await pool.request(origin, post(host, path, "", body, "application/json"))
        assert (got.status, got.body, got.header("x-a")) == (201, body, "b")
    assert len(connections) == 1
    server.close()


async def test_a_chunked_answer(pool: Pool) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    server, _ = await _serve(lambda _: [chunked[:40], chunked[40:50], chunked[50:]])
    got = await pool.request(_origin(server), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (got.status, got.body) == (200, b"abcde")
    server.close()


async def test_an_answer_without_a_body_and_a_closing_server(pool: Pool) -> None:
    """A 204 has no body and no length; after ``Connection: close`` the next request takes a new
    connection."""
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    answers = iter([[b"HTTP/1.1 204 No Content\r\n\r\n"], [closing], [closing]])
    server, connections = await _serve(lambda _: next(answers))
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert (await pool.request(_origin(server), request)).status == 204
    assert (await pool.request(_origin(server), request)).body == b"ok"
    assert (await pool.request(_origin(server), request)).body == b"ok"
    assert len(connections) == 2
    server.close()


async def test_a_connection_idle_too_long_is_replaced() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    server, connections = await _serve(lambda _: [ok])
    pool = Pool(idle=0.05, timeout=2.0)
    await pool.request(_origin(server), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    await pool.request(_origin(server), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    pool.close()
    assert len(connections) == 2
    server.close()


async def test_no_answer_is_an_error(pool: Pool) -> None:
    server, _ = await _serve(lambda _: [])  # closes without answering
    with pytest.raises(HttpError, match="closed the connection"):
        await pool.request(_origin(server), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    silent, _ = await _serve(lambda _: [b"HTTP/1.1 200 OK\r\n"])  # a head that never ends
    impatient = Pool(idle=5.0, timeout=0.2)
    with pytest.raises(HttpError, match="no answer within"):
        await impatient.request(_origin(silent), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    impatient.close()
    server.close()
    silent.close()
