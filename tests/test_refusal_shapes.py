"""A body over its cap is answered in the route's error shape whether its length was declared (the
entry refuses it unread, ``trustplane.limits``) or it was streamed (refused at the chunk that
crosses the cap, the handler's mapping or the entry answering). On ``/ssf`` the shape was
``application/problem+json`` for a declared length and ``{"error": ...}`` JSON for a streamed body;
the SSF management API answers every other error as ``{"error", "error_description"}``, the push
receiver as RFC 8935 §2.3 ``{"err", "description"}``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.protocol_server import Server, running_server
from tests.ssf.test_transmitter import auth

pytestmark = pytest.mark.asyncio(loop_scope="module")
BIG = b'{"description": "' + b"x" * 70_000 + b'"}'  # over every /ssf body cap (64 KiB)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(request, tmp_path_factory, "sqlite") as started:
        yield started


async def chunks() -> AsyncIterator[bytes]:
    for start in range(0, len(BIG), 8192):
        yield BIG[start : start + 8192]


async def too_large(server: Server, method: str, path: str, kind: str, chunked: bool) -> Any:
    answer = await server.http.request(
        method,
        path,
        content=chunks() if chunked else BIG,
        headers={**auth(server), "Content-Type": kind},
    )
    assert answer.status_code == 413, answer.text
    assert answer.headers["content-type"].split(";")[0] == "application/json", answer.headers
    return answer.json()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/ssf/stream"),
        ("PATCH", "/ssf/stream"),
        ("PUT", "/ssf/stream"),
        ("POST", "/ssf/status"),
        ("POST", "/ssf/verify"),
        ("POST", "/ssf/poll/s1"),
    ],
)
async def test_an_ssf_body_too_large_is_oauth_shaped_declared_or_streamed(
    server: Server, method: str, path: str
) -> None:
    declared = await too_large(server, method, path, "application/json", chunked=False)
    streamed = await too_large(server, method, path, "application/json", chunked=True)
    for body in (declared, streamed):
        assert body["error"] == "invalid_request", body
        assert "larger than" in body["error_description"], body
    if path.startswith("/ssf/poll"):  # RFC 8936 §2.4.4: the poll's errors also carry ``err``
        assert declared["err"] == "invalid_request", declared


async def test_a_set_too_large_is_answered_as_rfc_8935_declared_or_streamed(server: Server) -> None:
    for chunked in (False, True):
        body = await too_large(server, "POST", "/ssf/receiver", "application/secevent+jwt", chunked)
        assert body["err"] == "invalid_request", body
        assert "larger than" in body["description"], body
