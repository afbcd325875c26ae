"""AuthzenClient over a real loopback connection through the guarded fetcher (not httpx's mock
transport): the token request and the decisions arrive as httpx would send them, each request in one
socket write, every decision on the one kept-alive connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import httpcore
import pytest

from trustplane.authzen.model import Entity
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.outbound.connection import AsyncioBackend, GuardedBackend
from trustplane.pep import AuthzenClient, ClientSecretBasic

DECISION = b'{"decision": true, "context": {"decision_id": "d-1", "reason_ids": ["r"]}}'
TOKEN = b'{"access_token": "tok-1", "expires_in": 300}'


class Recording(AsyncioBackend):
    """The real socket layer, recording each write made on the connections it opens."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.connections = 0

    async def connect_tcp(self, *args: Any, **kw: Any) -> httpcore.AsyncNetworkStream:
        self.connections += 1
        stream = await super().connect_tcp(*args, **kw)
        inner_write, writes = stream.write, self.writes

        async def write(buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
            writes.append(buffer)
            await inner_write(buffer, timeout)

        stream.write = write  # type: ignore[method-assign]
        return stream


@pytest.fixture
async def pdp() -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]]]]:
    """A keep-alive HTTP/1.1 server answering /token and any evaluation; keeps (head, body)."""
    received: list[tuple[bytes, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(
                    line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
                )
                body = await reader.readexactly(int(fields.get(b"Content-Length", b"0")))
                received.append((head, body))
                answer = TOKEN if head.startswith(b"POST /token ") else DECISION
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(answer))
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], received
    server.close()
    await server.wait_closed()


async def test_decisions_over_the_guarded_connection_one_write_each(
    pdp: tuple[int, list[tuple[bytes, bytes]]],
) -> None:
    port, received = pdp
    wire = Recording()
    fetcher = OutboundFetcher(
        OutboundPolicy.development(), backend=GuardedBackend(allow_loopback=True, inner=wire)
    )
    base = f"http://127.0.0.1:{port}"
    client = AuthzenClient(
        base, token_endpoint=f"{base}/token", auth=ClientSecretBasic("rs", "s"), fetcher=fetcher
    )
    subject, resource = Entity("Client", "c-1"), Entity("Order", "O-1")
    for i in range(3):
        decision = await client.decide(
            subject, "order:create", resource, {}, correlation_id=f"r{i}"
        )
        assert decision.allowed
        assert decision.decision_id == "d-1"
    await fetcher.aclose()

    assert wire.connections == 1
    assert len(wire.writes) == len(received) == 4  # the token, then three decisions
    assert [head + body for head, body in received] == wire.writes
    token_head, token_body = received[0]
    assert token_head.startswith(b"POST /token HTTP/1.1\r\n")
    assert b"\r\nContent-Type: application/x-www-form-urlencoded\r\n" in token_head
    assert b"\r\nAuthorization: Basic cnM6cw==\r\n" in token_head
    form = parse_qs(token_body.decode())
    assert form["grant_type"] == ["client_credentials"]
    assert form["resource"] == [f"{base}/access/v1"]
    for i, (head, body) in enumerate(received[1:]):
        assert head.startswith(b"POST /access/v1/evaluation HTTP/1.1\r\n")
        assert f"\r\nHost: 127.0.0.1:{port}\r\n".encode() in head
        assert b"\r\nAccept-Encoding: identity\r\n" in head
        assert b"\r\nAuthorization: Bearer tok-1\r\n" in head
        assert f"\r\nX-Request-ID: r{i}\r\n".encode() in head
        assert json.loads(body)["action"] == {"name": "order:create"}
