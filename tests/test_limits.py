"""Request size limits at the ASGI entry (``trustplane.limits``), driven with raw ASGI messages so that
every byte the app pulls from the client is counted: a refused body must not have been read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import LEI, _Started, make_settings
from trustplane.app import Services, TrustplaneApp, create_app
from trustplane.limits import BoundedRequests, RequestLimits, json_text_problem, request_limits

CHUNK = 16 * 1024
CAP = 64 * 1024


@dataclass
class Client:
    """One request's client side: a body delivered in ``CHUNK``-sized pieces, counted as the app
    pulls them, and the response collected."""

    body_size: int = 0
    pulled: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)

    async def receive(self) -> dict[str, Any]:
        if self.pulled >= self.body_size:
            return {"type": "http.disconnect"}
        size = min(CHUNK, self.body_size - self.pulled)
        self.pulled += size
        return {
            "type": "http.request",
            "body": b"a" * size,
            "more_body": self.pulled < self.body_size,
        }

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    def json(self) -> Any:
        return orjson.loads(b"".join(m.get("body", b"") for m in self.messages[1:]))


def scope(path: str, headers: list[tuple[bytes, bytes]], method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


FORM = (b"content-type", b"application/x-www-form-urlencoded")
CHUNKED = (b"transfer-encoding", b"chunked")


async def call(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], body_size: int = 0
) -> Client:
    client = Client(body_size)
    await app(scope(path, headers), client.receive, client.send)
    return client


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Services]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'limits.db'}"
    from trustplane.storage.migrate import upgrade

    svc = Services.build(make_settings(url, tmp_path))
    await upgrade(svc.db)
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
def app(started: Services) -> TrustplaneApp:
    return create_app(started.settings, services=_Started(started))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bodies


async def test_content_length_over_the_cap_is_refused_before_reading(app: TrustplaneApp) -> None:
    length = (b"content-length", str(200 << 20).encode())
    client = await call(app, "/token", [FORM, length], body_size=200 << 20)
    assert client.status == 413
    assert client.json()["error"] == "invalid_request"
    assert client.headers[b"connection"] == b"close"
    assert client.pulled == 0


async def test_a_streamed_body_stops_being_read_at_the_cap(app: TrustplaneApp) -> None:
    client = await call(app, "/token", [FORM, CHUNKED], body_size=200 << 20)
    assert (client.status, client.json()["error"]) == (413, "invalid_request")
    assert client.pulled <= CAP + CHUNK
    assert client.headers[b"connection"] == b"close"


@pytest.mark.parametrize("path", ["/introspect", "/revoke"])
async def test_every_form_endpoint_is_bounded(app: TrustplaneApp, path: str) -> None:
    client = await call(app, path, [FORM, CHUNKED], body_size=10 << 20)
    assert (client.status, client.json()["error"]) == (413, "invalid_request")
    assert client.pulled <= CAP + CHUNK


async def test_a_body_within_the_cap_reaches_the_handler(app: TrustplaneApp) -> None:
    client = await call(app, "/token", [FORM, (b"content-length", b"1000")], body_size=1000)
    assert client.pulled == 1000
    assert client.status == 400  # read and parsed: "a=aaa..." is no grant
    assert client.json()["error"] == "invalid_request"


async def test_register_without_a_token_is_refused_without_reading(app: TrustplaneApp) -> None:
    json_type = (b"content-type", b"application/json")
    client = await call(app, "/register", [json_type, CHUNKED], body_size=300 << 20)
    assert (client.status, client.json()["error"]) == (401, "invalid_token")
    assert client.pulled == 0
    assert client.headers[b"connection"] == b"close"


async def test_register_with_a_wrong_token_is_refused_without_reading(app: TrustplaneApp) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer not-a-token"),
        (b"content-length", b"60000"),
    ]
    client = await call(app, "/register", headers, body_size=60000)
    assert (client.status, client.json()["error"]) == (401, "invalid_token")
    assert client.pulled == 0


async def test_register_with_a_good_token_and_a_streamed_big_body_is_413(
    app: TrustplaneApp, started: Services
) -> None:
    token = await started.clients.create_initial_access_token("limits test", max_uses=1, lei=LEI)
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer " + token.encode()),
        CHUNKED,
    ]
    client = await call(app, "/register", headers, body_size=300 << 20)
    assert (client.status, client.json()["error"]) == (413, "invalid_request")
    assert client.pulled <= CAP + CHUNK


@pytest.mark.parametrize("value", [b"12abc", b"-1", b""])
async def test_a_malformed_content_length_is_400(app: TrustplaneApp, value: bytes) -> None:
    client = await call(app, "/token", [FORM, (b"content-length", value)])
    assert (client.status, client.json()["error"]) == (400, "invalid_request")


async def test_conflicting_content_lengths_are_400(app: TrustplaneApp) -> None:
    headers = [FORM, (b"content-length", b"10"), (b"content-length", b"20")]
    client = await call(app, "/token", headers, body_size=10)
    assert client.status == 400
    assert client.pulled == 0


async def test_routes_have_their_own_caps(started: Services) -> None:
    limits = request_limits(started.settings)
    assert limits.body_cap("/token") == 64 * 1024
    assert limits.body_cap("/register/tp-x") == 64 * 1024
    assert limits.body_cap("/access/v1/evaluations") == 256 * 1024
    assert limits.body_cap("/access/v1/simulations") == 4 << 20
    assert limits.body_cap("/access/v1/evaluationsx") == 64 * 1024


async def test_the_cap_follows_the_setting(tmp_path: Path) -> None:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path, max_body_bytes=2048
    )
    assert request_limits(settings).body_cap("/mandates") == 2048


# --------------------------------------------------------------------------- other handlers


def _reading_app() -> Starlette:
    async def echo(request: Request) -> Response:
        return Response(str(len(await request.body())))

    return Starlette(routes=[Route("/upload", echo, methods=["POST"])])


def _fastapi_app() -> FastAPI:
    api = FastAPI()

    @api.post("/mandates")
    async def create(request: Request) -> Response:
        try:
            await request.body()
        except Exception:  # a handler that maps every failure to its own answer
            return Response(b"oops", 500)
        return Response(b"ok")

    return api


async def test_a_handler_that_does_not_catch_the_overflow_still_answers_413() -> None:
    app = BoundedRequests(_reading_app(), RequestLimits(max_body=CAP))
    client = await call(app, "/upload", [CHUNKED], body_size=10 << 20)
    assert client.status == 413
    assert client.headers[b"content-type"] == b"application/problem+json"
    assert client.json() == {
        "type": "about:blank",
        "title": "Content Too Large",
        "status": 413,
        "detail": f"the request body is larger than {CAP} bytes",
    }
    assert client.pulled <= CAP + CHUNK


async def test_a_handler_that_answers_something_else_is_overridden_with_413() -> None:
    app = BoundedRequests(_fastapi_app(), RequestLimits(max_body=CAP))
    client = await call(app, "/mandates", [CHUNKED], body_size=10 << 20)
    assert (client.status, client.json()["error"]) == (413, "invalid_request")
    assert len([m for m in client.messages if m["type"] == "http.response.start"]) == 1


async def test_a_fully_read_body_keeps_the_connection() -> None:
    app = BoundedRequests(_reading_app(), RequestLimits(max_body=CAP))
    client = await call(app, "/upload", [(b"content-length", b"5000")], body_size=5000)
    assert client.status == 200
    assert b"connection" not in client.headers


# --------------------------------------------------------------------------- headers


def flood(count: int, size: int = 8) -> list[tuple[bytes, bytes]]:
    return [(f"x-h{i}".encode(), b"v" * size) for i in range(count)]


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        (flood(2000), "more than 100 header fields"),
        ([(b"x-big", b"v" * (1 << 20))], "the header fields are larger than 32768 bytes"),
        (flood(90, 400), "the header fields are larger than 32768 bytes"),
    ],
    ids=["2000 fields", "1 MB field", "90 fields of 400 bytes"],
)
async def test_header_floods_are_431(
    app: TrustplaneApp, headers: list[tuple[bytes, bytes]], detail: str
) -> None:
    client = await call(app, "/token", [FORM, *headers, (b"content-length", b"10")], body_size=10)
    assert client.status == 431
    assert client.json() == {"error": "invalid_request", "error_description": detail}
    assert client.pulled == 0


async def test_header_floods_elsewhere_are_problem_json(app: TrustplaneApp) -> None:
    client = Client()
    await app(scope("/jwks", flood(500), "GET"), client.receive, client.send)
    assert client.status == 431
    assert client.json()["title"] == "Request Header Fields Too Large"


async def test_headers_within_the_limits_pass(app: TrustplaneApp) -> None:
    client = Client()
    await app(scope("/jwks", flood(90, 100), "GET"), client.receive, client.send)
    assert client.status == 200


async def test_refusals_are_counted(app: TrustplaneApp) -> None:
    from prometheus_client import REGISTRY

    def count(reason: str) -> float:
        value = REGISTRY.get_sample_value("trustplane_requests_refused_total", {"reason": reason})
        return value or 0.0

    declared, headers = count("body_declared"), count("headers")
    await call(app, "/token", [FORM, (b"content-length", b"99999999")])
    await call(app, "/token", flood(200))
    assert (count("body_declared"), count("headers")) == (declared + 1, headers + 1)


# --------------------------------------------------------------------------- audit of entry refusals


async def _refused_events(services: Services) -> list[dict[str, Any]]:
    from trustplane.audit.sink import recent_events

    return await recent_events(services.db, limit=1000, type_="oauth:token:refused")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([FORM, (b"content-length", str(200 << 20).encode())], 413),
        ([FORM, *flood(500)], 431),
        ([FORM, (b"content-length", b"x")], 400),
    ],
    ids=["413", "431", "400"],
)
async def test_a_token_request_refused_at_the_entry_is_audited(
    app: TrustplaneApp, started: Services, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    before = len(await _refused_events(started))
    client = await call(app, "/token", headers)
    assert client.status == status
    refused = await _refused_events(started)
    assert len(refused) == before + 1
    assert (refused[0]["reason"], refused[0]["decision"]) == ("invalid_request", "deny")


async def test_a_failing_audit_hook_does_not_change_the_refusal() -> None:
    async def broken(_exc: Exception) -> None:
        raise RuntimeError("database gone")

    app = BoundedRequests(_reading_app(), RequestLimits(max_body=CAP), {"/upload": broken})
    client = await call(app, "/upload", [(b"content-length", b"99999999")])
    assert client.status == 413


# --------------------------------------------------------------------------- the hot paths' body


def _fast_app(seen: list[tuple[bytes, int]]) -> TrustplaneApp:
    """A hot-path route that reads its body through Starlette (``seen``: the body and how many
    ``receive`` calls the handler itself made)."""

    async def echo(request: Request) -> Response:
        calls = 0
        inner = request.receive

        async def counted() -> Any:
            nonlocal calls
            calls += 1
            return await inner()

        request._receive = counted
        body = await request.body()
        seen.append((body, calls))
        return Response(b"ok")

    return TrustplaneApp(FastAPI(), [Route("/echo", echo, methods=["POST"])], RequestLimits())


async def test_a_declared_body_the_server_holds_whole_reaches_the_handler_read() -> None:
    """Content-Length within the cap, the body in one message: the entry receives it and the
    handler's ``body()`` needs no ``receive`` of its own (Starlette's generator skipped)."""
    seen: list[tuple[bytes, int]] = []
    client = await call(_fast_app(seen), "/echo", [(b"content-length", b"5000")], body_size=5000)
    assert client.status == 200
    assert seen == [(b"a" * 5000, 0)]
    assert client.pulled == 5000


async def test_a_declared_body_still_arriving_is_read_whole_by_the_handler() -> None:
    """A body the server delivers in pieces (``more_body``): the first piece, already received at
    the entry, is handed back first; the handler reads the rest as before."""
    seen: list[tuple[bytes, int]] = []
    size = 3 * CHUNK + 10
    client = await call(
        _fast_app(seen), "/echo", [(b"content-length", str(size).encode())], body_size=size
    )
    assert client.status == 200
    assert seen == [(b"a" * size, 4)]  # the replayed first piece, then three more


async def test_a_streamed_body_is_left_to_the_handler() -> None:
    seen: list[tuple[bytes, int]] = []
    client = await call(_fast_app(seen), "/echo", [CHUNKED], body_size=2 * CHUNK)
    assert client.status == 200
    assert seen == [(b"a" * 2 * CHUNK, 2)]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"a": "b"}', None),
        (b'{"a": "\\u00e9 \xc3\xa9"}', None),
        (b'{"a": "\\\\u0000"}', None),  # a backslash and the text u0000
        (b'{"a": "\\ud83d\\ude00"}', None),  # a pair
        (b'{"a": "\\uD83D\\uDE00"}', None),
        (b'{"a": "\\u0000"}', "NUL"),
        (b'{"\\u0000": 1}', "NUL"),
        (b'{"a": "\\\\\\u0000"}', "NUL"),  # an escaped backslash, then the escape
        (b'{"a": "\\ud83d"}', "surrogate"),
        (b'{"a": "\\ude00"}', "surrogate"),
        (b'{"a": "\\ud83dx\\ude00"}', "surrogate"),
        (b'{"a": "\\ud83d\\\\\\ude00"}', "surrogate"),  # not adjacent: a backslash between
        (b'{"a": "\\ud83d\\u0041"}', "surrogate"),
        (b'{"a": "\xff"}', "UTF-8"),
    ],
)
def test_json_text_problem(body: bytes, problem: str | None) -> None:
    """The JSON body check of the entry: a NUL or an unpaired surrogate escape, or bytes that are
    not UTF-8; an escaped backslash before ``u0000`` is text, not an escape."""
    found = json_text_problem(body)
    assert found is None if problem is None else problem in (found or ""), found
