"""SSF 1.0, RFC 8935 and RFC 8936: the MUSTs of the transmitter's HTTP interface that
test_transmitter.py does not already check, each with its negative case and the exact status and
error code (docs/ssf.md, "Conformance", maps every MUST to its test). Real HTTP against the app, on
SQLite and PostgreSQL; plus no body of the stream management API answers 500 or writes half of an
update (a hypothesis run over near-valid and random bodies)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete

from tests.conftest import free_port, register_kit
from tests.mandates.conftest import grantee, terms
from tests.protocol_server import DATABASES, Server, running_server
from tests.ssf.test_transmitter import auth, create, decode_set, outbox_rows, poll, revoke_one
from trustplane.ssf.http import ssf_router
from trustplane.ssf.tables import ssf_outbox, ssf_streams
from trustplane.ssf.transmitter import (
    MAX_STREAMS_PER_CLIENT,
    POLL,
    PUSH,
    SESSION_REVOKED,
    STREAM_UPDATED,
    TOKEN_CLAIMS_CHANGE,
    Transmitter,
    configuration_url,
)
from trustplane.ssf.wiring import SharedSignals

pytestmark = pytest.mark.asyncio(loop_scope="module")
JSON = {"Content-Type": "application/json"}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(
        request, tmp_path_factory, ssf_allow_insecure_loopback=True, ssf_poll_wait=0.6
    ) as started:
        yield started


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def no_streams(server: Server) -> AsyncIterator[None]:
    """Each test starts without streams (the module shares one server)."""
    yield
    async with server.services.db.transaction() as conn:
        await conn.execute(delete(ssf_outbox))
        await conn.execute(delete(ssf_streams))


async def read(server: Server, stream_id: str) -> dict[str, Any]:
    answer = await server.http.get(
        "/ssf/stream", params={"stream_id": stream_id}, headers=auth(server)
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def component(server: Server) -> SharedSignals:
    ssf = next(c for c in server.services.components if c.name == "ssf")
    assert isinstance(ssf, SharedSignals)
    return ssf


def transmitter(server: Server) -> Transmitter:
    return component(server).transmitter


def assert_error(answer: Any, status: int, error: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"] == error
    assert answer.headers["cache-control"] == "no-store"


# ---------------------------------------------------------------- metadata (SSF 1.0 §7)


async def test_configuration_is_a_json_object_without_empty_claims(server: Server) -> None:
    """§7.2: the document MUST be returned as application/json; claims with zero elements
    MUST be omitted (Transmitter Configuration Response); §7.1: ``issuer`` MUST be the SETs'
    ``iss`` (decode_set checks it)."""
    answer = await server.http.get("/.well-known/ssf-configuration")
    assert answer.status_code == 200
    assert answer.headers["content-type"].split(";")[0] == "application/json"
    doc = answer.json()
    assert all(value not in ([], {}, "") for value in doc.values()), doc
    assert doc["issuer"] == server.issuer
    assert doc["default_subjects"] in ("ALL", "NONE")


async def test_an_issuer_with_a_path_has_its_configuration_before_the_path(server: Server) -> None:
    """§7.2: for an issuer with a path, the document MUST be at ``/.well-known/ssf-configuration``
    inserted between the host and the path (it was served only at the root of the app, where a
    receiver following the spec finds nothing)."""
    issuer = "http://127.0.0.1:8000/tenant-1"
    assert (
        configuration_url(issuer) == "http://127.0.0.1:8000/.well-known/ssf-configuration/tenant-1"
    )
    assert configuration_url(issuer + "/") == configuration_url(issuer)
    settings = server.services.settings.model_copy(update={"issuer": issuer})
    ssf = component(server)
    app = FastAPI()
    app.include_router(
        ssf_router(
            Transmitter(settings, server.services.db, server.services.keys, ssf.fetchers[0]),
            ssf.receiver,
            ssf.guard,
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        answer = await http.get("/.well-known/ssf-configuration/tenant-1")
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["issuer"] == issuer
        assert answer.json()["configuration_endpoint"] == issuer + "/ssf/stream"
        other = await http.get("/.well-known/ssf-configuration/tenant-2")
        assert other.status_code == 404


# ---------------------------------------------------------------- authorization (SSF 1.0 §8)

MANAGEMENT = [
    ("POST", "/ssf/stream", {}),
    ("GET", "/ssf/stream", None),
    ("PATCH", "/ssf/stream", {"stream_id": "s"}),
    ("PUT", "/ssf/stream", {"stream_id": "s"}),
    ("DELETE", "/ssf/stream?stream_id=s", None),
    ("GET", "/ssf/status?stream_id=s", None),
    ("POST", "/ssf/status", {"stream_id": "s", "status": "paused"}),
    ("POST", "/ssf/verify", {"stream_id": "s"}),
    ("POST", "/ssf/poll/s", {"returnImmediately": True}),
]


@pytest.mark.parametrize(("method", "path", "body"), MANAGEMENT)
async def test_every_management_endpoint_answers_401_without_a_token(
    server: Server, method: str, path: str, body: Any
) -> None:
    """§8: the management API MUST use HTTP authorization; §8.1.2.1: an unauthorized request
    MUST get 401. One guard for all of them (RFC 6750: ``invalid_token``, a bare challenge)."""
    content = None if body is None else json.dumps(body).encode()
    answer = await server.http.request(method, path, content=content, headers=JSON)
    assert_error(answer, 401, "invalid_token")
    assert answer.headers["www-authenticate"] == 'Bearer realm="trustplane"'


NOT_THERE = "AAAAAAAAAAAAAAAAAAAAAA"  # a well-formed stream id that names no stream


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"/ssf/stream?stream_id={NOT_THERE}", None),
        ("PATCH", "/ssf/stream", {"stream_id": NOT_THERE, "description": "x"}),
        ("PUT", "/ssf/stream", {"stream_id": NOT_THERE}),
        ("DELETE", f"/ssf/stream?stream_id={NOT_THERE}", None),
        ("GET", f"/ssf/status?stream_id={NOT_THERE}", None),
        ("POST", "/ssf/status", {"stream_id": NOT_THERE, "status": "paused"}),
        ("POST", "/ssf/verify", {"stream_id": NOT_THERE}),
        ("POST", f"/ssf/poll/{NOT_THERE}", {"returnImmediately": True}),
    ],
)
async def test_an_unknown_stream_is_404(server: Server, method: str, path: str, body: Any) -> None:
    """§8.1.1.2-§8.1.4.2: no stream with that id for this receiver: 404 (the status endpoint:
    MUST)."""
    content = None if body is None else json.dumps(body).encode()
    answer = await server.http.request(
        method, path, content=content, headers={**auth(server), **JSON}
    )
    assert_error(answer, 404, "not_found")


NUL_IS_400 = (400, "invalid_request")  # no string of a request may hold one (trustplane.limits)


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("GET", "/ssf/stream?stream_id=a%00b", None, NUL_IS_400),
        ("PATCH", "/ssf/stream", {"stream_id": "a\x00b", "description": "x"}, NUL_IS_400),
        ("PUT", "/ssf/stream", {"stream_id": "a\x00b"}, NUL_IS_400),
        ("DELETE", "/ssf/stream?stream_id=a%00b", None, NUL_IS_400),
        ("GET", "/ssf/status?stream_id=a%00b", None, NUL_IS_400),
        ("POST", "/ssf/status", {"stream_id": "a\x00b", "status": "paused"}, NUL_IS_400),
        ("POST", "/ssf/verify", {"stream_id": "a\x00b"}, NUL_IS_400),
        ("POST", "/ssf/poll/a%00b", {"returnImmediately": True}, NUL_IS_400),
        ("GET", "/ssf/stream?stream_id=" + "s" * 65, None, (404, "not_found")),
        ("GET", "/ssf/stream?stream_id=a%20b", None, (404, "not_found")),
    ],
)
async def test_a_stream_id_no_stream_can_have_is_404_not_500(
    server: Server, method: str, path: str, body: Any, expected: tuple[int, str]
) -> None:
    """A stream id with a NUL reached PostgreSQL's ``text`` comparison, which refuses it: every
    management endpoint answered 500; a NUL is now refused with 400 before any handler reads it.
    Our stream ids are RFC 3986 unreserved characters (§8.1.1 SHOULD), so any other string names
    no stream: 404 before any query."""
    content = None if body is None else json.dumps(body).encode()
    answer = await server.http.request(
        method, path, content=content, headers={**auth(server), **JSON}
    )
    assert_error(answer, *expected)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/ssf/stream", {"description": "x"}),
        ("PUT", "/ssf/stream", {"stream_id": 7}),
        ("GET", "/ssf/status", None),
        ("POST", "/ssf/status", {"status": "paused"}),
        ("POST", "/ssf/verify", {"stream_id": ""}),
    ],
)
async def test_a_request_without_its_stream_id_is_400(
    server: Server, method: str, path: str, body: Any
) -> None:
    """§8.1.1.3 (the stream_id MUST be present), §8.1.1.4, §8.1.2 and §8.1.4.2 (REQUIRED)."""
    content = None if body is None else json.dumps(body).encode()
    answer = await server.http.request(
        method, path, content=content, headers={**auth(server), **JSON}
    )
    assert_error(answer, 400, "invalid_request")
    assert answer.json()["error_description"] == "stream_id is required"


@pytest.mark.parametrize("path", ["/ssf/stream", "/ssf/receiver"])
@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_cap_is_413_and_writes_nothing(
    server: Server, path: str, chunked: bool
) -> None:
    """Every body is bounded before it is read (64 KiB): a declared length over the cap is
    refused unread, a streamed one at the chunk that crosses it; 413, never a 500, no stream."""
    big = b'{"description": "' + b"x" * 70_000 + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    kind = "application/json" if path == "/ssf/stream" else "application/secevent+jwt"
    answer = await server.http.post(
        path, content=chunks() if chunked else big, headers={**auth(server), "Content-Type": kind}
    )
    assert answer.status_code == 413, answer.text
    assert (await server.http.get("/ssf/stream", headers=auth(server))).json() == []


# ---------------------------------------------------------------- create / read (§8.1.1.1-2)


async def test_create_without_delivery_is_poll_with_our_endpoint(server: Server) -> None:
    """§8.1.1.1: no ``delivery``: the transmitter MUST assume poll and MUST answer a ``delivery``
    with ``method`` and ``endpoint_url`` (ours, unique per stream: §6.1.2)."""
    first = await create(server, {"events_requested": [SESSION_REVOKED]})
    second = await create(server, {"events_requested": [SESSION_REVOKED]})
    for config in (first, second):
        assert config["delivery"] == {
            "method": POLL,
            "endpoint_url": f"{server.issuer}/ssf/poll/{config['stream_id']}",
        }
    assert first["stream_id"] != second["stream_id"]  # §8.1.1: MUST be unique


async def test_a_client_at_its_stream_cap_gets_409(server: Server) -> None:
    """§8.1.1.1: a transmitter that does not allow another stream for this receiver MUST answer
    409 Conflict (it answered 400 ``invalid_request``, as if the request were malformed); the
    receiver may then read and update the streams it has."""
    for _ in range(MAX_STREAMS_PER_CLIENT):
        await create(server, {})
    answer = await server.http.post("/ssf/stream", json={}, headers=auth(server))
    assert_error(answer, 409, "conflict")
    listed = await server.http.get("/ssf/stream", headers=auth(server))
    assert len(listed.json()) == MAX_STREAMS_PER_CLIENT  # nothing written


@pytest.mark.parametrize(
    ("delivery", "message"),
    [
        ({"method": PUSH, "endpoint_url": "http://receiver.example/events"}, "endpoint_url is not"),
        ({"method": PUSH, "endpoint_url": "https://a\x00b.example/x"}, "NUL"),
        ({"method": PUSH, "endpoint_url": "https://receiver.example/a b"}, "control characters"),
        ({"method": PUSH, "endpoint_url": "https://r.example/" + "a" * 2100}, "at most 2048"),
        (None, "delivery must be an object"),
    ],
)
async def test_create_refuses_a_delivery_it_cannot_honour(
    server: Server, delivery: Any, message: str
) -> None:
    """RFC 8935 §5.3: push MUST use TLS (https, unless development loopback); an endpoint with a
    NUL or a space was stored and every push to it failed; an explicit ``null`` delivery is not
    an object (it silently became poll)."""
    answer = await server.http.post(
        "/ssf/stream", json={"delivery": delivery}, headers=auth(server)
    )
    assert_error(answer, 400, "invalid_request")
    assert message in answer.json()["error_description"]
    assert (await server.http.get("/ssf/stream", headers=auth(server))).json() == []


async def test_read_without_stream_id_lists_the_callers_streams(server: Server) -> None:
    """§8.1.1.2: no ``stream_id``: the transmitter MUST return the list, an empty one when there
    are no streams; another client's streams are not in it."""
    empty = await server.http.get("/ssf/stream", headers=auth(server))
    assert empty.status_code == 200
    assert empty.json() == []
    mine = await create(server, {})
    other = await register_kit(server.services)
    await create(server, {}, client_id=other.client_id)
    listed = await server.http.get("/ssf/stream", headers=auth(server))
    assert [s["stream_id"] for s in listed.json()] == [mine["stream_id"]]


# ---------------------------------------------------------------- update / replace (§8.1.1.3-4)

WRONG_SUPPLIED = [
    ("iss", "https://elsewhere.example"),
    ("aud", "someone-else"),
    ("aud", ["someone-else"]),
    ("events_supported", [SESSION_REVOKED]),
    ("events_delivered", [TOKEN_CLAIMS_CHANGE]),
    ("events_delivered", "not-a-list"),
    ("min_verification_interval", 60),
    ("delivery", {"method": POLL, "endpoint_url": "https://receiver.example/mine"}),
]


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
@pytest.mark.parametrize(("member", "value"), WRONG_SUPPLIED)
async def test_a_transmitter_supplied_member_that_does_not_match_is_400(
    server: Server, method: str, member: str, value: Any
) -> None:
    """§8.1.1.3/§8.1.1.4: transmitter-supplied members besides ``stream_id`` MAY be present but
    MUST match the expected value (``events_delivered``: its value before the update), else 400.
    They were silently ignored (200), so a receiver believed it had changed its audience. The
    stream stays as it was, the requested change included."""
    stream = await create(server, {"events_requested": [SESSION_REVOKED]})
    body = {"stream_id": stream["stream_id"], "description": "changed", member: value}
    answer = await server.http.request(method, "/ssf/stream", json=body, headers=auth(server))
    assert_error(answer, 400, "invalid_request")
    assert member in answer.json()["error_description"]
    assert await read(server, stream["stream_id"]) == stream


async def test_the_configuration_read_back_is_a_valid_replacement(server: Server) -> None:
    """§8.1.1.4: a receiver MAY read the configuration, change it and PUT it back: every
    transmitter-supplied member it carries matches (``aud`` as a one-element array too), and
    ``events_delivered`` is compared with its value before the update."""
    stream = await create(server, {"events_requested": [SESSION_REVOKED]})
    body = {**stream, "aud": [stream["aud"]], "events_requested": [TOKEN_CLAIMS_CHANGE]}
    answer = await server.http.put("/ssf/stream", json=body, headers=auth(server))
    assert answer.status_code == 200, answer.text
    assert answer.json()["events_delivered"] == [TOKEN_CLAIMS_CHANGE]
    patched = await server.http.patch(
        "/ssf/stream", json={**answer.json(), "description": "d"}, headers=auth(server)
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["description"] == "d"


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
@pytest.mark.parametrize(
    "change",
    [
        {"events_requested": [TOKEN_CLAIMS_CHANGE], "description": "x" * 300},
        {"events_requested": [TOKEN_CLAIMS_CHANGE], "delivery": None},
        {"delivery": {"method": PUSH, "endpoint_url": "http://10.0.0.1/r"}},
        {
            "delivery": {
                "method": PUSH,
                "endpoint_url": "https://r.example/e",
                "authorization_header": 7,
            }
        },
    ],
)
async def test_a_refused_update_leaves_the_stream_and_its_queue_as_they_were(
    server: Server, method: str, change: dict[str, Any]
) -> None:
    """A PATCH or PUT that is refused writes nothing: not the members before the bad one, not the
    switch of delivery method (which drops the queue), and the queued SETs stay. ``delivery:
    null`` in a PATCH switched a stream to poll and dropped its queue (200)."""
    stream = await create(server, {"events_requested": [SESSION_REVOKED]})
    await revoke_one(server)
    queued = await outbox_rows(server, stream["stream_id"])
    assert len(queued) == 1
    answer = await server.http.request(
        method,
        "/ssf/stream",
        json={"stream_id": stream["stream_id"], **change},
        headers=auth(server),
    )
    assert_error(answer, 400, "invalid_request")
    assert await read(server, stream["stream_id"]) == stream
    assert [r.jti for r in await outbox_rows(server, stream["stream_id"])] == [queued[0].jti]


# ---------------------------------------------------------------- delete (§8.1.1.5)


async def test_delete_needs_the_stream_id(server: Server) -> None:
    """§8.1.1.5: the DELETE request MUST include ``stream_id``: without it, 400 and nothing goes."""
    stream = await create(server, {})
    answer = await server.http.delete("/ssf/stream", headers=auth(server))
    assert_error(answer, 400, "invalid_request")
    assert await read(server, stream["stream_id"]) == stream


# ---------------------------------------------------------------- status (§8.1.2)


async def test_a_paused_push_stream_transmits_nothing_until_enabled(server: Server) -> None:
    """§8.1.2.1: paused: the transmitter MUST NOT transmit (the SETs are held); enabled: MUST
    transmit; the re-enabling is announced by ``stream-updated`` (§8.1.5) whose ``sub_id`` MUST be
    ``opaque`` with the stream id."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/events"
    stream = await create(
        server,
        {"delivery": {"method": PUSH, "endpoint_url": url}, "events_requested": [SESSION_REVOKED]},
    )
    sid = stream["stream_id"]
    paused = await server.http.post(
        "/ssf/status", json={"stream_id": sid, "status": "paused"}, headers=auth(server)
    )
    assert paused.json() == {"stream_id": sid, "status": "paused"}
    jti = await revoke_one(server)
    assert await transmitter(server).deliver_due() == 0  # nothing is due
    held = await outbox_rows(server, sid)
    assert len(held) == 2  # stream-updated (paused) and the revocation, both held
    assert all(r.attempts == 0 for r in held)

    received: list[dict[str, Any]] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        received.append(decode_set(server, (await reader.readexactly(length)).decode(), url))
        writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    listening = await asyncio.start_server(accept, "127.0.0.1", port)
    try:
        enabled = await server.http.post(
            "/ssf/status", json={"stream_id": sid, "status": "enabled"}, headers=auth(server)
        )
        assert enabled.status_code == 200
        for _ in range(500):
            if len(received) == 3:
                break
            await asyncio.sleep(0.02)
    finally:
        listening.close()
        await listening.wait_closed()
    # §8.1.2.1: held events are transmitted in the order they were generated
    assert [next(iter(r["events"])) for r in received] == [
        STREAM_UPDATED,
        SESSION_REVOKED,
        STREAM_UPDATED,
    ]
    assert received[1]["sub_id"]["jti"] == jti
    updates = [r for r in received if STREAM_UPDATED in r["events"]]
    assert [u["events"][STREAM_UPDATED]["status"] for u in updates] == ["paused", "enabled"]
    assert all(u["sub_id"] == {"format": "opaque", "id": sid} for u in updates)


async def test_a_disabled_stream_holds_nothing(server: Server) -> None:
    """§8.1.2.1: disabled: the transmitter MUST NOT transmit and holds nothing: what was queued
    goes, what happens while disabled is never sent, not even after enabling."""
    stream = await create(server, {"events_requested": [SESSION_REVOKED]})
    sid = stream["stream_id"]
    await revoke_one(server)
    disabled = await server.http.post(
        "/ssf/status", json={"stream_id": sid, "status": "disabled"}, headers=auth(server)
    )
    assert disabled.json() == {"stream_id": sid, "status": "disabled"}
    assert await outbox_rows(server, sid) == []
    await revoke_one(server)
    assert await outbox_rows(server, sid) == []
    await server.http.post(
        "/ssf/status", json={"stream_id": sid, "status": "enabled"}, headers=auth(server)
    )
    sets = (await poll(server, stream))["sets"].values()
    events = [decode_set(server, t, server.kit.client_id)["events"] for t in sets]
    assert events == [{STREAM_UPDATED: {"status": "enabled"}}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"status": "paused", "reason": "a\x00b"}, "NUL"),
        ({"status": "paused", "reason": 5}, "reason"),
        ({"status": None}, "status must be"),
        ({}, "status must be"),
    ],
)
async def test_status_update_refusals(server: Server, body: dict[str, Any], message: str) -> None:
    """§8.1.2.2: an invalid request is 400 and changes nothing. A reason with a NUL went into
    PostgreSQL's ``reason`` column, which refuses it: 500."""
    stream = await create(server, {})
    answer = await server.http.post(
        "/ssf/status", json={"stream_id": stream["stream_id"], **body}, headers=auth(server)
    )
    assert_error(answer, 400, "invalid_request")
    assert message in answer.json()["error_description"]
    status = await server.http.get(
        "/ssf/status", params={"stream_id": stream["stream_id"]}, headers=auth(server)
    )
    assert status.json() == {"stream_id": stream["stream_id"], "status": "enabled"}


# ---------------------------------------------------------------- push (RFC 8935, SSF §6.1.1)


async def test_push_sends_the_authorization_header_with_every_request(server: Server) -> None:
    """SSF 1.0 §6.1.1: if ``authorization_header`` is present, the transmitter MUST send it with
    every request to ``endpoint_url``; RFC 8935 §2: POST, ``Content-Type:
    application/secevent+jwt``, one SET per request."""
    port = free_port()
    seen: list[dict[str, str]] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")
        fields = {k.lower(): v for k, v in (x.split(": ", 1) for x in lines[1:] if ": " in x)}
        fields["request-line"] = lines[0]
        await reader.readexactly(int(fields["content-length"]))
        seen.append(fields)
        writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    listening = await asyncio.start_server(accept, "127.0.0.1", port)
    try:
        await create(
            server,
            {
                "delivery": {
                    "method": PUSH,
                    "endpoint_url": f"http://127.0.0.1:{port}/events",
                    "authorization_header": "Bearer receiver-secret",
                },
                "events_requested": [SESSION_REVOKED],
            },
        )
        await revoke_one(server)
        await revoke_one(server)
        for _ in range(500):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        listening.close()
        await listening.wait_closed()
    assert len(seen) == 2
    for fields in seen:
        assert fields["request-line"] == "POST /events HTTP/1.1"
        assert fields["authorization"] == "Bearer receiver-secret"
        assert fields["content-type"] == "application/secevent+jwt"


# ---------------------------------------------------------------- poll (RFC 8936)


@pytest.mark.parametrize(
    "body",
    [
        {"maxEvents": -1},
        {"maxEvents": "10"},
        {"returnImmediately": "yes"},
        {"ack": "j1"},
        {"ack": [1]},
        {"setErrs": {"j1": "bad"}},
        {"setErrs": {"j1": {"description": "no err"}}},
        [],
    ],
)
async def test_a_bad_poll_request_is_400_with_rfc8936_err(server: Server, body: Any) -> None:
    """RFC 8936 §2.4.4: a poll request the transmitter cannot parse is answered 400 with a JSON
    object carrying ``err`` and ``description`` (RFC 8935 §2.3's members; ``error`` and
    ``error_description`` stay for OAuth-shaped clients). It carried only the latter."""
    stream = await create(server, {})
    answer = await server.http.post(
        f"/ssf/poll/{stream['stream_id']}", json=body, headers=auth(server)
    )
    assert_error(answer, 400, "invalid_request")
    assert answer.json()["err"] == "invalid_request"
    assert answer.json()["description"] == answer.json()["error_description"]


async def test_poll_ignores_acknowledgements_that_name_no_set(server: Server) -> None:
    """RFC 8936 §2.2: ``ack``/``setErrs`` name SETs by ``jti``; one that names no SET of the
    stream changes nothing. A jti with a NUL reached PostgreSQL and the poll answered 500 (the
    acknowledgements of the good jtis in the same request were lost with it): such a request is
    now refused whole (400, ``trustplane.limits``), nothing acknowledged."""
    stream = await create(server, {"events_requested": [SESSION_REVOKED]})
    await revoke_one(server)
    await revoke_one(server)
    first, second = list((await poll(server, stream))["sets"])
    refused = await server.http.post(
        f"/ssf/poll/{stream['stream_id']}",
        json={"returnImmediately": True, "ack": [first, "a\x00b"]},
        headers=auth(server),
    )
    assert_error(refused, 400, "invalid_request")
    assert set((await poll(server, stream))["sets"]) == {first, second}
    errs = {"x": {"err": "invalid_request"}, second: {"err": "invalid_key"}}
    answer = await poll(server, stream, ack=[first, "nope"], setErrs=errs)
    assert answer == {"sets": {}, "moreAvailable": False}


async def test_a_receiver_cannot_acknowledge_another_streams_sets(server: Server) -> None:
    """SSF 1.0 §8: only the receiver a stream belongs to may act on it. A jti of another stream
    (another client's) in ``ack`` or ``setErrs`` removes nothing there."""
    theirs_client = await register_kit(server.services)
    theirs = await create(server, {"events_requested": [SESSION_REVOKED]}, theirs_client.client_id)
    mine = await create(server, {"events_requested": [SESSION_REVOKED]})
    await revoke_one(server)
    [their_jti] = [r.jti for r in await outbox_rows(server, theirs["stream_id"])]
    errs = {their_jti: {"err": "invalid_request"}}
    await poll(server, mine, ack=[their_jti], setErrs=errs)
    assert [r.jti for r in await outbox_rows(server, theirs["stream_id"])] == [their_jti]


# ---------------------------------------------------------------- CAEP 1.0 event bodies


async def test_caep_event_bodies_are_well_formed(server: Server) -> None:
    """CAEP 1.0 (Optional Event Claims): ``initiating_entity`` MUST be admin, user, policy or
    system; ``reason_admin`` MUST hold one or more language-tag keys; ``event_timestamp`` is the
    time of the change; ``token-claims-change`` MUST carry a non-empty ``claims`` object. Our SETs:
    a token revocation and a mandate suspended and revoked. SSF 1.0: ``sub_id`` always, no
    ``sub``, no ``exp``, ``typ`` ``secevent+jwt`` (decode_set)."""
    stream = await create(server, {"events_requested": [SESSION_REVOKED, TOKEN_CLAIMS_CHANGE]})
    svc = server.services
    client = await grantee(svc)
    mandate = await svc.mandates.create(terms(client.client_id), actor="test", accepted_by="alice")
    started = int(time.time())
    await revoke_one(server)
    await svc.mandates.suspend(mandate.id, actor="test", reason="review")
    await svc.mandates.revoke(mandate.id, actor="test", reason="ended")
    sets = [
        decode_set(server, t, server.kit.client_id)
        for t in (await poll(server, stream, maxEvents=10))["sets"].values()
    ]
    kinds = [next(iter(c["events"])) for c in sets]
    assert sorted(kinds) == sorted([SESSION_REVOKED, TOKEN_CLAIMS_CHANGE, SESSION_REVOKED])
    for claims in sets:
        assert isinstance(claims["sub_id"], dict)
        assert claims["sub_id"]["format"]
        [(kind, body)] = claims["events"].items()
        assert body["initiating_entity"] in ("admin", "user", "policy", "system")
        assert started - 1 <= body["event_timestamp"] <= int(time.time()) + 1
        if "reason_admin" in body:
            reason = body["reason_admin"]
            assert isinstance(reason, dict)
            assert reason
            assert all(isinstance(v, str) for v in reason.values())
        if kind == TOKEN_CLAIMS_CHANGE:
            assert isinstance(body["claims"], dict)
            assert body["claims"]


# ---------------------------------------------------------------- no 500, no partial write

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["\x00", POLL, PUSH, SESSION_REVOKED, "enabled", "paused", "disabled"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
SID = "THE-STREAM"  # replaced by the fuzzed stream's id
#: A valid body per endpoint; each example keeps, drops or replaces each member, and may add one.
VALID: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/ssf/stream"): {
        "delivery": {"method": POLL},
        "events_requested": [SESSION_REVOKED],
        "description": "d",
    },
    ("PATCH", "/ssf/stream"): {"stream_id": SID, "events_requested": [SESSION_REVOKED]},
    ("PUT", "/ssf/stream"): {"stream_id": SID, "delivery": {"method": POLL}, "description": "d"},
    ("POST", "/ssf/status"): {"stream_id": SID, "status": "paused", "reason": "r"},
    ("POST", "/ssf/verify"): {"stream_id": SID, "state": "s"},
    ("POST", f"/ssf/poll/{SID}"): {"maxEvents": 5, "ack": ["x"], "setErrs": {}},
}
ENDPOINTS = list(VALID)
EXTRA = ["iss", "aud", "events_supported", "events_delivered", "min_verification_interval"]
REPLACEMENTS = (
    st.sampled_from(
        [
            SID,
            "a\x00b",
            ["a\x00b"],
            {"a\x00b": {"err": "x"}},
            {"method": PUSH, "endpoint_url": "http://127.0.0.1:9/e"},
            {"method": PUSH, "endpoint_url": "https://10.0.0.1/e"},
            {"method": PUSH},
            {"method": POLL, "endpoint_url": "https://r.example/p"},
        ]
    )
    | json_values
)


@st.composite
def near_valid(draw: st.DrawFn, endpoint: tuple[str, str]) -> dict[str, Any]:
    body = dict(VALID[endpoint])
    for key in list(body):
        choice = draw(st.sampled_from(["keep", "keep", "drop", "replace"]))
        if choice == "drop":
            del body[key]
        elif choice == "replace":
            body[key] = draw(REPLACEMENTS)
    if draw(st.booleans()):
        body[draw(st.sampled_from([*EXTRA, "stream_id", "delivery"]))] = draw(REPLACEMENTS)
    return body


@pytest_asyncio.fixture(loop_scope="module")
async def fuzzed(server: Server) -> AsyncIterator[dict[str, Any]]:
    yield await create(server, {"events_requested": [SESSION_REVOKED]})


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(endpoint=st.sampled_from(ENDPOINTS), data=st.data())
async def test_no_management_body_answers_500_or_writes_a_refused_change(
    server: Server, fuzzed: dict[str, Any], endpoint: tuple[str, str], data: st.DataObject
) -> None:
    """Any body to any stream management endpoint: a 2xx, or a JSON 400/404/409 with its error
    code, never a 500; and a refused PATCH/PUT leaves the stream exactly as it was."""
    body = data.draw(near_valid(endpoint) | json_values | st.binary(max_size=40))
    method, path = endpoint
    sid = fuzzed["stream_id"]
    path = path.replace(SID, sid)
    if isinstance(body, dict) and body.get("stream_id") == SID:
        body["stream_id"] = sid
    if isinstance(body, dict) and "returnImmediately" not in body:
        body["returnImmediately"] = True  # a long poll would only make the run slow
    before = (await server.http.get("/ssf/stream", headers=auth(server))).json()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = await server.http.request(
        method, path, content=content, headers={**auth(server), **JSON}
    )
    assert answer.status_code in (200, 201, 204, 400, 404, 409), answer.text
    event(f"{method} {path.split('/')[2]} {answer.status_code}")
    if answer.status_code >= 400:
        assert answer.json()["error"] in ("invalid_request", "not_found", "conflict")
        after = (await server.http.get("/ssf/stream", headers=auth(server))).json()
        assert after == before
    elif method == "POST" and path == "/ssf/stream":  # keep under the stream cap
        await server.http.delete(
            "/ssf/stream", params={"stream_id": answer.json()["stream_id"]}, headers=auth(server)
        )
