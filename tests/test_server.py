"""``trustplane.server``: binding before anything is printed, the header limits in the HTTP parser, the
listener dispatch, and the operations app (``create_ops_app``) apart from the public one."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from tests.conftest import _Started, free_port, make_settings
from trustplane import server as server_module
from trustplane.app import Services, TrustplaneApp, create_app, create_ops_app
from trustplane.limits import RequestLimits
from trustplane.server import (
    BoundedHttpToolsProtocol,
    Listeners,
    bind,
    freezing_when_started,
)
from trustplane.settings import SettingsError

TRUSTPLANE = str(Path(sys.executable).with_name("trustplane"))


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port another socket is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


# --------------------------------------------------------------------------- binding


def test_a_taken_public_port_names_its_setting(tmp_path: Path, taken: int) -> None:
    settings = make_settings("sqlite://", tmp_path, port=taken, ops_port=0)
    with pytest.raises(SettingsError) as exc:
        bind(settings)
    assert str(exc.value) == (
        f"invalid setting TRUSTPLANE_PORT / --port: cannot listen on 127.0.0.1:{taken}: "
        "address already in use; stop the process that holds it or choose another port"
    )


def test_a_taken_ops_port_names_its_setting_and_frees_the_public_one(
    tmp_path: Path, taken: int
) -> None:
    public = free_port()
    settings = make_settings("sqlite://", tmp_path, port=public, ops_port=taken)
    with pytest.raises(SettingsError, match=r"^invalid setting TRUSTPLANE_OPS_PORT: .*in use"):
        bind(settings)
    with socket.socket() as again:  # the public socket was closed, not leaked
        again.bind(("127.0.0.1", public))


def test_bind_returns_both_sockets(tmp_path: Path) -> None:
    settings = make_settings("sqlite://", tmp_path, port=free_port(), ops_port=free_port())
    sockets = bind(settings)
    try:
        assert [s.getsockname()[1] for s in sockets] == [settings.port, settings.ops_port]
    finally:
        for sock in sockets:
            sock.close()


def test_ops_port_zero_disables_the_listener(tmp_path: Path) -> None:
    settings = make_settings("sqlite://", tmp_path, port=free_port(), ops_port=0)
    sockets = bind(settings)
    try:
        assert len(sockets) == 1
    finally:
        sockets[0].close()


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TRUSTPLANE_")}
    environ.update(TRUSTPLANE_DATA_DIR=str(tmp_path / "data"), **env)
    return subprocess.run(
        [TRUSTPLANE, "serve"], env=environ, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("which", ["TRUSTPLANE_PORT", "TRUSTPLANE_OPS_PORT"])
def test_serve_on_a_taken_port_prints_one_line_and_exits_2(
    tmp_path: Path, taken: int, which: str
) -> None:
    ports = {"TRUSTPLANE_PORT": str(free_port()), "TRUSTPLANE_OPS_PORT": str(free_port())}
    ports[which] = str(taken)
    proc = _serve(tmp_path, **ports)
    assert proc.returncode == 2
    assert proc.stdout == ""  # no banner, no trustplane_started
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"trustplane: invalid setting {which}")
    assert "address already in use" in lines[0]
    assert not (tmp_path / "data").exists()  # nothing was migrated or created


# --------------------------------------------------------------------------- the HTTP parser


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name)

    def write(self, data: bytes) -> None:
        self.written += data
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_protocol(self, protocol: Any) -> None: ...


@pytest.fixture
async def protocol() -> AsyncIterator[tuple[BoundedHttpToolsProtocol, FakeTransport]]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a refused request must not reach the app")

    config = Config(app, http=BoundedHttpToolsProtocol, log_level="warning")
    config.load()
    BoundedHttpToolsProtocol.limits = RequestLimits(
        max_header_bytes=32 * 1024, max_header_count=100
    )
    proto = BoundedHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    yield proto, transport
    BoundedHttpToolsProtocol.limits = RequestLimits()


def _status(transport: FakeTransport) -> bytes:
    return transport.written.split(b"\r\n", 1)[0]


async def test_a_huge_header_is_refused_while_it_arrives(
    protocol: tuple[BoundedHttpToolsProtocol, FakeTransport],
) -> None:
    proto, transport = protocol
    proto.data_received(b"POST /token HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    while not transport.closed and sent < (1 << 20):
        proto.data_received(b"v" * 4096)
        sent += 4096
    assert transport.closed
    assert sent <= 2 * 32 * 1024  # stopped at twice max_header_bytes, not after 1 MB
    assert _status(transport) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b'"error":"invalid_request"' in transport.written


async def test_too_many_header_fields_are_refused_while_parsing(
    protocol: tuple[BoundedHttpToolsProtocol, FakeTransport],
) -> None:
    proto, transport = protocol
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
    proto.data_received(b"GET /jwks HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert transport.closed
    assert _status(transport) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"more than 100 header fields" in transport.written
    assert b"application/problem+json" in transport.written


async def test_a_big_field_in_a_complete_head_is_refused(
    protocol: tuple[BoundedHttpToolsProtocol, FakeTransport],
) -> None:
    proto, transport = protocol
    proto.data_received(b"GET /jwks HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 40000 + b"\r\n\r\n")
    assert _status(transport) == b"HTTP/1.1 431 Request Header Fields Too Large"


async def test_a_malformed_request_is_still_400(
    protocol: tuple[BoundedHttpToolsProtocol, FakeTransport],
) -> None:
    proto, transport = protocol
    proto.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    assert _status(transport) == b"HTTP/1.1 400 Bad Request"


def _answering(body: bytes) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def _served(app: Any, *requests: bytes) -> FakeTransport:
    """The bytes ``app`` answered ``requests`` with, through the server's protocol."""
    config = Config(app, http=BoundedHttpToolsProtocol, log_level="warning")
    config.load()
    proto = BoundedHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    for request in requests:
        proto.data_received(request)
        for _ in range(20):
            await asyncio.sleep(0)
    return transport


async def test_a_response_goes_out_in_one_write() -> None:
    transport = await _served(
        _answering(b'{"access_token":"t"}'),
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na=b",
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na=c",
    )
    assert len(transport.writes) == 2  # one per response: head and body together
    for write in transport.writes:
        assert write.startswith(b"HTTP/1.1 200 OK\r\n")
        assert write.endswith(b'\r\n\r\n{"access_token":"t"}')


async def test_a_head_response_without_a_body_write_still_sends_its_head() -> None:
    transport = await _served(_answering(b"12345"), b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.writes == [transport.written]
    assert transport.written.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 5\r\n" in transport.written
    assert transport.written.endswith(b"\r\n\r\n")


async def test_100_continue_is_not_held_back_for_the_response() -> None:
    transport = await _served(
        _answering(b"ok"),
        b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        b"a=b",
    )
    # the client waits for it before sending its body: it went out alone, before the response
    assert transport.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert len(transport.writes) == 2
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[1].endswith(b"\r\n\r\nok")


async def test_a_connection_close_response_is_complete_before_the_close() -> None:
    transport = await _served(
        _answering(b"ok"), b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert transport.closed
    assert len(transport.writes) == 1
    assert transport.written.endswith(b"\r\n\r\nok")


# --------------------------------------------------------------------------- listeners


@pytest.fixture
async def apps(tmp_path: Path) -> AsyncIterator[tuple[TrustplaneApp, Any, Services]]:
    from trustplane.storage.migrate import upgrade

    svc = Services.build(make_settings(f"sqlite+aiosqlite:///{tmp_path / 's.db'}", tmp_path))
    await upgrade(svc.db)
    await svc.start()
    public = create_app(svc.settings, services=_Started(svc))  # type: ignore[arg-type]
    async with public.router.lifespan_context(public):  # the ledger's sequencer runs
        yield public, create_ops_app(svc, public.openapi), svc
    await svc.stop()


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")


@pytest.mark.parametrize("path", ["/metrics", "/openapi.json", "/docs"])
async def test_operations_endpoints_are_not_on_the_public_listener(
    apps: tuple[TrustplaneApp, Any, Services], path: str
) -> None:
    public, ops, _ = apps
    async with _client(public) as http:
        assert (await http.get(path)).status_code == 404
    async with _client(ops) as http:
        assert (await http.get(path)).status_code == 200


async def test_the_ops_app_serves_the_public_openapi_document(
    apps: tuple[TrustplaneApp, Any, Services],
) -> None:
    _, ops, _ = apps
    async with _client(ops) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
        docs = (await http.get("/docs")).text
        metrics = (await http.get("/metrics")).text
    assert {"/token", "/register"} <= set(paths)
    assert "/openapi.json" in docs
    assert "trustplane_tokens_issued_total" in metrics


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_and_readiness_are_on_both_listeners(
    apps: tuple[TrustplaneApp, Any, Services], path: str
) -> None:
    public, ops, _ = apps
    for app in (public, ops):
        async with _client(app) as http:
            assert (await http.get(path)).status_code == 200


async def test_listeners_dispatch_by_local_port(apps: tuple[TrustplaneApp, Any, Services]) -> None:
    public, ops, _ = apps
    both = Listeners(public, ops, 9464)
    seen: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            seen.append(message["status"])

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    for port in (9464, 8000):
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": "/metrics", "raw_path": b"/metrics", "query_string": b"",
            "root_path": "", "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", port),
        }  # fmt: skip
        await both(scope, receive, send)
    assert seen == [200, 404]


@pytest.mark.parametrize("kind", ["serve", "reference serve"])
async def test_a_worker_freezes_its_long_lived_objects_when_its_lifespan_has_started(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """trustplane.startup.freeze_after_start runs once, after the app's start-up and before uvicorn
    hears ``lifespan.startup.complete`` (so before the first request); nothing else freezes.
    ``trustplane serve`` (:class:`Listeners`) and ``trustplane reference serve``
    (:func:`freezing_when_started`) alike."""
    events: list[str] = []
    monkeypatch.setattr(server_module, "freeze_after_start", lambda: events.append("freeze"))

    async def lifespan_app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                events.append("started")
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> Any:
        return next(incoming)

    async def send(message: Any) -> None:
        events.append(message["type"])

    wrap = (
        Listeners(lifespan_app, None, 9464)
        if kind == "serve"
        else freezing_when_started(lifespan_app)
    )
    await wrap({"type": "lifespan"}, receive, send)
    assert events == [
        "started",
        "freeze",
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


# --------------------------------------------------------------------------- settings


def test_the_ops_listener_defaults_to_loopback_9464(tmp_path: Path) -> None:
    settings = make_settings("sqlite://", tmp_path)
    assert (settings.ops_host, settings.ops_port) == ("127.0.0.1", 9464)


def test_an_empty_ops_port_disables_the_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    from trustplane.settings import load_settings

    monkeypatch.setenv("TRUSTPLANE_OPS_PORT", "")
    assert load_settings().ops_port == 0


def test_the_ops_port_must_differ_from_the_public_one() -> None:
    from trustplane.settings import load_settings

    with pytest.raises(SettingsError) as exc:
        load_settings(port=9000, ops_port=9000)
    assert str(exc.value) == (
        "invalid setting TRUSTPLANE_OPS_PORT: must differ from TRUSTPLANE_PORT (0 disables it)"
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_body_bytes", "10"), ("max_header_count", "5"), ("ops_port", "70000")],
)
def test_limits_out_of_range_name_their_setting(name: str, value: str) -> None:
    from trustplane.settings import load_settings

    with pytest.raises(SettingsError, match=rf"^invalid setting TRUSTPLANE_{name.upper()}: "):
        load_settings(**{name: value})
