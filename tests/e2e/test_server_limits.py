"""A real ``trustplane serve`` on loopback: bodies and headers bounded before they are read (issue 11
item 4), operations endpoints only on the operations listener (item 7), readiness (item 9).

Requests are written on raw sockets so that the test controls exactly what the server receives."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.e2e.conftest import LiveServer, running_servers

MB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_servers(tmp_path_factory.mktemp("limits")) as servers:
        yield servers.start()


def exchange(
    server: LiveServer, head: bytes, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (and ``body``), read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    raw_headers, _, content = rest.partition(b"\r\n\r\n")
    headers = {}
    for line in raw_headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        headers[name.decode().lower()] = value.decode().strip()
    return int(status_line.split()[1]), headers, content


def post_head(path: str, *fields: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *fields, "", ""]
    return "\r\n".join(lines).encode()


FORM = "Content-Type: application/x-www-form-urlencoded"


def test_a_declared_200_mb_body_is_refused_before_it_is_sent(server: LiveServer) -> None:
    status, headers, content = exchange(
        server, post_head("/token", FORM, f"Content-Length: {200 * MB}")
    )
    assert status == 413
    assert orjson.loads(content) == {
        "error": "invalid_request",
        "error_description": "the request body is larger than 65536 bytes",
    }
    assert headers["connection"] == "close"


def test_a_chunked_body_is_cut_at_the_cap(server: LiveServer) -> None:
    chunk = b"a" * 16384
    body = b"".join(b"4000\r\n" + chunk + b"\r\n" for _ in range(5))  # 80 KiB, never terminated
    status, headers, content = exchange(
        server, post_head("/token", FORM, "Transfer-Encoding: chunked"), body
    )
    assert (status, orjson.loads(content)["error"]) == (413, "invalid_request")
    assert headers["connection"] == "close"


def test_register_without_a_token_is_401_before_the_body(server: LiveServer) -> None:
    head = post_head("/register", "Content-Type: application/json", "Transfer-Encoding: chunked")
    status, headers, content = exchange(server, head, b"4000\r\n" + b"{" * 16384 + b"\r\n")
    assert (status, orjson.loads(content)["error"]) == (401, "invalid_token")
    assert headers["connection"] == "close"


def test_two_thousand_header_fields_are_431(server: LiveServer) -> None:
    fields = [f"X-Flood-{i}: v" for i in range(2000)]
    status, _, content = exchange(server, post_head("/token", FORM, "Content-Length: 0", *fields))
    assert status == 431
    assert orjson.loads(content) == {
        "error": "invalid_request",
        "error_description": "more than 100 header fields",
    }


def test_a_40_kib_header_field_is_431(server: LiveServer) -> None:
    status, _, content = exchange(server, post_head("/jwks", "X-Big: " + "v" * 40960))
    assert status == 431
    assert orjson.loads(content)["title"] == "Request Header Fields Too Large"


def _peak_rss(server: LiveServer) -> int:
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return next(
        int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")
    )


def _stream(server: LiveServer, total: int, sent: list[int]) -> None:
    """POST ``total`` bytes of chunked body to /token until the server stops the connection."""
    chunk = b"4000\r\n" + b"a" * 16384 + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(post_head("/token", FORM, "Transfer-Encoding: chunked"))
        try:
            while sent[0] < total:
                sock.sendall(chunk)
                sent[0] += 16384
        except OSError:  # the server answered 413 and closed: the rest is never read
            return


def test_four_concurrent_200_mb_posts_do_not_grow_the_server(server: LiveServer) -> None:
    """The issue's measurement: 4 x 200 MB to /token took a worker from 154 MB to 1.5-1.8 GB."""
    before = _peak_rss(server)
    sent = [[0] for _ in range(4)]
    threads = [threading.Thread(target=_stream, args=(server, 200 * MB, s)) for s in sent]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(s[0] < 50 * MB for s in sent), sent  # refused early, not read to the end
    assert _peak_rss(server) - before < 64 * MB
    assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/openapi.json", "/docs"])
def test_operations_endpoints_are_only_on_the_ops_listener(server: LiveServer, path: str) -> None:
    assert httpx.get(f"{server.base_url}{path}", timeout=5).status_code == 404
    assert httpx.get(f"{server.ops_url}{path}", timeout=5).status_code == 200


def test_refusals_show_in_the_metrics(server: LiveServer) -> None:
    exchange(server, post_head("/token", FORM, f"Content-Length: {MB}"))
    metrics = httpx.get(f"{server.ops_url}/metrics", timeout=5).text
    assert 'trustplane_requests_refused_total{reason="body_declared"}' in metrics


def test_readiness_on_both_listeners(server: LiveServer) -> None:
    for base in (server.base_url, server.ops_url):
        response = httpx.get(f"{base}/readyz", timeout=5)
        assert response.status_code == 200
        assert response.json()["status"] == "ready"
        assert set(response.json()["checks"]) == {"database", "keys", "ledger"}
