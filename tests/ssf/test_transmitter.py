"""The SSF 1.0 transmitter over HTTP, in process, on SQLite and PostgreSQL: metadata, stream
management (each MUST with its negative case and exact error), SETs checked by an independent JOSE
library (PyJWT), poll per RFC 8936 (ack, setErrs, maxEvents, returnImmediately), push per RFC 8935
with the receiver down: retried with exponential backoff, nothing lost."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import pytest_asyncio
from sqlalchemy import delete, select

from tests.conftest import EXECUTION, LEI, free_port, register_kit, wait_until
from tests.mandates.conftest import grantee, terms
from tests.protocol_server import DATABASES, Server, running_server
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.protocol.tokens import issue_access_token
from trustplane.ssf.tables import ssf_outbox, ssf_streams
from trustplane.ssf.transmitter import (
    POLL,
    PUSH,
    PUSH_BATCH,
    SESSION_REVOKED,
    STREAM_UPDATED,
    TOKEN_CLAIMS_CHANGE,
    VERIFICATION,
    Transmitter,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
BASE = 0.4  # ssf_retry_base of this module's server


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(
        request,
        tmp_path_factory,
        ssf_allow_insecure_loopback=True,
        ssf_retry_base=BASE,
        ssf_retry_max=30,
        ssf_poll_wait=0.6,
    ) as started:
        yield started


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def no_streams(server: Server) -> AsyncIterator[None]:
    """Each test starts without streams (the module shares one server)."""
    yield
    async with server.services.db.transaction() as conn:
        await conn.execute(delete(ssf_outbox))
        await conn.execute(delete(ssf_streams))


def ssf_token(server: Server, client_id: str | None = None, scope: str = "ssf:stream") -> str:
    return issue_access_token(
        server.services.keys.ring,
        issuer=server.issuer,
        subject=client_id or server.kit.client_id,
        client_id=client_id or server.kit.client_id,
        audience=server.issuer + "/ssf",
        scopes=(scope,),
        lifetime=300,
        extra={"lei": LEI},
    ).token


def auth(server: Server, client_id: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {ssf_token(server, client_id)}"}


async def create(server: Server, body: dict[str, Any], client_id: str | None = None) -> Any:
    answer = await server.http.post("/ssf/stream", json=body, headers=auth(server, client_id))
    assert answer.status_code == 201, answer.text
    return answer.json()


async def poll(server: Server, stream: dict[str, Any], **body: Any) -> dict[str, Any]:
    body.setdefault("returnImmediately", True)
    answer = await server.http.post(
        f"/ssf/poll/{stream['stream_id']}", json=body, headers=auth(server)
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def decode_set(server: Server, token: str, audience: str) -> dict[str, Any]:
    """PyJWT, with the key from the deployment's published JWKS, checks signature, iss and aud."""
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "secevent+jwt"
    jwks = json.loads(server.services.keys.ring.jwks_json)
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    claims: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK(key).key,
        algorithms=[header["alg"]],
        audience=audience,
        issuer=server.issuer,
        options={"require": ["iss", "aud", "iat", "jti"]},
    )
    assert "exp" not in claims
    assert "sub" not in claims
    return claims


async def revoke_one(server: Server) -> str:
    """A token of the module's client, revoked through POST /revoke (RFC 7009): its jti."""
    token = await server.access_token()
    answer = await server.http.post("/revoke", data={"token": token, **server.kit.auth()})
    assert answer.status_code == 200, answer.text
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def test_configuration_metadata(server: Server) -> None:
    answer = await server.http.get("/.well-known/ssf-configuration")
    assert answer.status_code == 200
    doc = answer.json()
    assert doc["spec_version"] == "1_0"
    assert doc["issuer"] == server.issuer
    assert doc["jwks_uri"] == server.issuer + "/jwks"
    assert doc["delivery_methods_supported"] == [PUSH, POLL]
    for name, path in (
        ("configuration_endpoint", "/ssf/stream"),
        ("status_endpoint", "/ssf/status"),
        ("verification_endpoint", "/ssf/verify"),
    ):
        assert doc[name] == server.issuer + path
    assert doc["authorization_schemes"] == [{"spec_urn": "urn:ietf:rfc:6749"}]


async def test_stream_lifecycle(server: Server) -> None:
    config = await create(
        server, {"delivery": {"method": POLL}, "events_requested": [SESSION_REVOKED, "urn:x"]}
    )
    sid = config["stream_id"]
    assert config["iss"] == server.issuer
    assert config["aud"] == server.kit.client_id
    assert config["delivery"] == {"method": POLL, "endpoint_url": f"{server.issuer}/ssf/poll/{sid}"}
    assert config["events_delivered"] == [SESSION_REVOKED]  # the unknown one is not delivered
    read = await server.http.get("/ssf/stream", params={"stream_id": sid}, headers=auth(server))
    assert read.status_code == 200
    assert read.json() == config
    listed = await server.http.get("/ssf/stream", headers=auth(server))
    assert sid in [s["stream_id"] for s in listed.json()]
    patched = await server.http.patch(
        "/ssf/stream", json={"stream_id": sid, "description": "broker"}, headers=auth(server)
    )
    assert patched.status_code == 200
    assert patched.json()["description"] == "broker"
    assert patched.json()["events_delivered"] == [SESSION_REVOKED]  # PATCH keeps the rest
    put = await server.http.put(
        "/ssf/stream", json={"stream_id": sid, "delivery": {"method": POLL}}, headers=auth(server)
    )
    assert put.status_code == 200
    assert put.json()["events_delivered"] == []
    assert "description" not in put.json()
    status = await server.http.get("/ssf/status", params={"stream_id": sid}, headers=auth(server))
    assert status.json() == {"stream_id": sid, "status": "enabled"}
    gone = await server.http.delete("/ssf/stream", params={"stream_id": sid}, headers=auth(server))
    assert gone.status_code == 204
    again = await server.http.get("/ssf/stream", params={"stream_id": sid}, headers=auth(server))
    assert again.status_code == 404
    assert again.json()["error"] == "not_found"


BAD_STREAMS = [
    ({"delivery": {"method": "urn:example:smtp"}}, "delivery method must be"),
    ({"delivery": {"method": PUSH}}, "push delivery needs an endpoint_url"),
    ({"delivery": {"method": PUSH, "endpoint_url": "http://10.0.0.1/r"}}, "endpoint_url is not"),
    ({"delivery": "push"}, "delivery must be an object"),
    ({"events_requested": "all"}, "events_requested must be an array"),
    ({"description": "x" * 300}, "description must be a string"),
]


@pytest.mark.parametrize(("body", "message"), BAD_STREAMS)
async def test_create_refusals(server: Server, body: dict[str, Any], message: str) -> None:
    answer = await server.http.post("/ssf/stream", json=body, headers=auth(server))
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request"
    assert message in answer.json()["error_description"]
    assert answer.headers["cache-control"] == "no-store"


async def test_stream_management_needs_the_guard(server: Server) -> None:
    bare = await server.http.post("/ssf/stream", json={})
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"] == 'Bearer realm="trustplane"'
    wrong_scope = {"Authorization": f"Bearer {ssf_token(server, scope='audit:query')}"}
    denied = await server.http.post("/ssf/stream", json={}, headers=wrong_scope)
    assert denied.status_code == 403
    assert denied.json()["error"] == "insufficient_scope"
    assert 'scope="ssf:stream"' in denied.headers["www-authenticate"]
    other_api = issue_access_token(
        server.services.keys.ring,
        issuer=server.issuer,
        subject=server.kit.client_id,
        client_id=server.kit.client_id,
        audience=EXECUTION,
        scopes=("order:create",),
        lifetime=300,
    ).token
    refused = await server.http.get("/ssf/stream", headers={"Authorization": f"Bearer {other_api}"})
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_token"
    not_json = await server.http.post("/ssf/stream", content=b"{", headers=auth(server))
    assert not_json.status_code == 400
    assert not_json.json()["error"] == "invalid_request"


async def test_another_clients_stream_is_not_found(server: Server) -> None:
    mine = await create(server, {})
    other = await register_kit(server.services)
    for method, kwargs in (
        ("GET", {"params": {"stream_id": mine["stream_id"]}}),
        ("DELETE", {"params": {"stream_id": mine["stream_id"]}}),
        ("PATCH", {"json": {"stream_id": mine["stream_id"], "description": "x"}}),
    ):
        answer = await server.http.request(
            method, "/ssf/stream", headers=auth(server, other.client_id), **kwargs
        )
        assert answer.status_code == 404, (method, answer.text)
        assert answer.json()["error"] == "not_found"
    answer = await server.http.post(
        f"/ssf/poll/{mine['stream_id']}", json={}, headers=auth(server, other.client_id)
    )
    assert answer.status_code == 404


async def test_status_refusals(server: Server) -> None:
    stream = await create(server, {})
    bad = await server.http.post(
        "/ssf/status",
        json={"stream_id": stream["stream_id"], "status": "on"},
        headers=auth(server),
    )
    assert bad.status_code == 400
    assert bad.json()["error"] == "invalid_request"
    missing = await server.http.get("/ssf/status", headers=auth(server))
    assert missing.status_code == 400
    assert "stream_id is required" in missing.text


async def test_revocation_is_polled_as_a_session_revoked_set(server: Server) -> None:
    stream = await create(server, {"events_requested": [SESSION_REVOKED]})
    jti = await revoke_one(server)
    answer = await poll(server, stream)
    assert answer["moreAvailable"] is False
    [(set_jti, token)] = answer["sets"].items()
    claims = decode_set(server, token, server.kit.client_id)
    assert claims["jti"] == set_jti
    assert claims["sub_id"] == {"format": "jwt_id", "iss": server.issuer, "jti": jti}
    event = claims["events"][SESSION_REVOKED]
    assert isinstance(event["event_timestamp"], int)
    # unacknowledged: delivered again; acknowledged: gone
    assert set_jti in (await poll(server, stream))["sets"]
    assert (await poll(server, stream, ack=[set_jti]))["sets"] == {}


async def test_poll_max_events_set_errs_and_long_poll(server: Server) -> None:
    stream = await create(server, {"events_requested": [SESSION_REVOKED]})
    for _ in range(3):
        await revoke_one(server)
    first = await poll(server, stream, maxEvents=2)
    assert len(first["sets"]) == 2
    assert first["moreAvailable"] is True
    jtis = list(first["sets"])
    errs = {jtis[1]: {"err": "invalid_request", "description": "test"}}
    second = await poll(server, stream, ack=[jtis[0]], setErrs=errs, maxEvents=10)
    assert len(second["sets"]) == 1
    assert second["moreAvailable"] is False
    assert not set(jtis) & set(second["sets"])
    only_ack = await poll(server, stream, ack=list(second["sets"]), maxEvents=0)
    assert only_ack == {"sets": {}, "moreAvailable": False}
    started = time.monotonic()
    waited = await poll(server, stream, returnImmediately=False)
    assert waited["sets"] == {}
    assert time.monotonic() - started >= 0.5
    # a SET queued while the poll waits is returned at once
    task = asyncio.create_task(poll(server, stream, returnImmediately=False))
    await asyncio.sleep(0.1)
    await revoke_one(server)
    assert len((await task)["sets"]) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"maxEvents": -1}, "maxEvents"),
        ({"returnImmediately": "yes"}, "returnImmediately"),
        ({"ack": "j1"}, "ack must be"),
        ({"setErrs": {"j1": "bad"}}, "setErrs"),
    ],
)
async def test_poll_refusals(server: Server, body: dict[str, Any], message: str) -> None:
    stream = await create(server, {})
    answer = await server.http.post(
        f"/ssf/poll/{stream['stream_id']}", json=body, headers=auth(server)
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request"
    assert message in answer.json()["error_description"]


async def test_verification_and_stream_updated_events(server: Server) -> None:
    stream = await create(server, {})  # no event requested: verification is delivered anyway
    sid = stream["stream_id"]
    answer = await server.http.post(
        "/ssf/verify", json={"stream_id": sid, "state": "s-123"}, headers=auth(server)
    )
    assert answer.status_code == 204
    [token] = (await poll(server, stream))["sets"].values()
    claims = decode_set(server, token, server.kit.client_id)
    assert claims["events"] == {VERIFICATION: {"state": "s-123"}}
    assert claims["sub_id"] == {"format": "opaque", "id": sid}
    await poll(server, stream, ack=[claims["jti"]])
    paused = await server.http.post(
        "/ssf/status", json={"stream_id": sid, "status": "paused", "reason": "maintenance"},
        headers=auth(server),
    )  # fmt: skip
    assert paused.json() == {"stream_id": sid, "status": "paused", "reason": "maintenance"}
    assert (await poll(server, stream))["sets"] == {}  # a paused stream holds its events
    await server.http.post(
        "/ssf/status", json={"stream_id": sid, "status": "enabled"}, headers=auth(server)
    )
    events = [
        decode_set(server, t, server.kit.client_id)["events"]
        for t in (await poll(server, stream))["sets"].values()
    ]
    assert {"status": "paused", "reason": "maintenance"} in [e.get(STREAM_UPDATED) for e in events]
    assert {"status": "enabled"} in [e.get(STREAM_UPDATED) for e in events]
    disabled = await server.http.post(
        "/ssf/verify", json={"stream_id": "nope"}, headers=auth(server)
    )
    assert disabled.status_code == 404


class Receiver:
    """A push receiver on loopback (RFC 8935): answers 202 and keeps what it received."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[str, str]] = []  # (content type, body)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        lower = {k.lower(): v for k, v in headers.items()}
        body = await reader.readexactly(int(lower["content-length"]))
        self.received.append((lower["content-type"], body.decode()))
        writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()


async def outbox_rows(server: Server, stream_id: str) -> list[Any]:
    async with server.services.db.read() as conn:
        rows = await conn.execute(select(ssf_outbox).where(ssf_outbox.c.stream_id == stream_id))
        return list(rows.all())


# serial: it watches each retry of a 20 ms poll; another worker's load can hide one
@pytest.mark.serial
async def test_push_with_the_receiver_down_is_retried_with_backoff_and_nothing_lost(
    server: Server,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/events"
    stream = await create(
        server,
        {"delivery": {"method": PUSH, "endpoint_url": url}, "events_requested": [SESSION_REVOKED]},
    )
    assert stream["aud"] == url
    sid = stream["stream_id"]
    jtis = [await revoke_one(server) for _ in range(3)]

    async def attempted(n: int) -> list[Any]:
        rows = await outbox_rows(server, sid)
        return rows if len(rows) == 3 and all(r.attempts >= n for r in rows) else []

    scheduled: list[int] = []  # next_attempt_ms of one row after its 1st, 2nd, 3rd attempt
    for n in (1, 2, 3):
        deadline = time.monotonic() + 20
        rows: list[Any] = []
        while not rows and time.monotonic() < deadline:
            rows = await attempted(n)
            await asyncio.sleep(0.02)
        assert rows, f"not attempted {n} times"
        row = min(rows, key=lambda r: r.id)
        assert row.attempts == n
        assert row.last_error.startswith("error")
        scheduled.append(row.next_attempt_ms)
    # exponential: attempt n+1 happens no earlier than scheduled, then waits BASE * 2**n, so the
    # schedule moves by at least that and at most that plus one deliverer round and some slack
    for n, (before, after) in enumerate(itertools.pairwise(scheduled), start=1):
        delay = BASE * 2**n * 1000
        assert delay <= after - before <= delay + 1500, scheduled
    receiver = Receiver(port)
    await receiver.start()
    try:
        await asyncio.to_thread(
            wait_until, lambda: len(receiver.received) == 3, 15, "the backlog delivered"
        )
        # a row is deleted after its receiver answered 2xx: the third POST's delete may still be
        # on its way when the receiver has the body
        for _ in range(750):  # 15 s at most
            if not await outbox_rows(server, sid):
                break
            await asyncio.sleep(0.02)
    finally:
        await receiver.stop()
    assert await outbox_rows(server, sid) == []
    got = []
    for content_type, body in receiver.received:
        assert content_type == "application/secevent+jwt"
        got.append(decode_set(server, body, url)["sub_id"]["jti"])
    assert sorted(got) == sorted(jtis)  # every SET, none lost


async def test_a_receiver_refusal_is_not_retried(server: Server) -> None:
    """RFC 8935 §2.3: a 400 with an error code means this SET will never be accepted."""
    port = free_port()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"err":"invalid_audience","description":"no"}'
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    refusing = await asyncio.start_server(refuse, "127.0.0.1", port)
    try:
        stream = await create(
            server,
            {
                "delivery": {"method": PUSH, "endpoint_url": f"http://127.0.0.1:{port}/"},
                "events_requested": [SESSION_REVOKED],
            },
        )
        await revoke_one(server)
        for _ in range(200):
            if not await outbox_rows(server, stream["stream_id"]):
                break
            await asyncio.sleep(0.05)
        assert await outbox_rows(server, stream["stream_id"]) == []
    finally:
        refusing.close()
        await refusing.wait_closed()


async def test_unpolled_sets_of_a_poll_stream_do_not_hold_back_a_push_stream(
    server: Server,
) -> None:
    """The push deliverer reads the due rows in id order, ``PUSH_BATCH`` at a time. A poll stream's
    SETs were queued due (``next_attempt_ms`` 0) like a push stream's: once its receiver left
    ``PUSH_BATCH`` of them unpolled, every round read those and skipped them, and no push SET
    queued after them was delivered. They are never due for the push deliverer now."""
    polled = await create(server, {"events_requested": [SESSION_REVOKED]})
    for _ in range(PUSH_BATCH + 1):
        await revoke_one(server)
    assert len(await outbox_rows(server, polled["stream_id"])) == PUSH_BATCH + 1
    port = free_port()
    receiver = Receiver(port)
    await receiver.start()
    try:
        pushed = await create(
            server,
            {
                "delivery": {"method": PUSH, "endpoint_url": f"http://127.0.0.1:{port}/e"},
                "events_requested": [SESSION_REVOKED],
            },
        )
        jti = await revoke_one(server)
        await asyncio.to_thread(
            wait_until, lambda: len(receiver.received) == 1, 15, "the push SET delivered"
        )
    finally:
        await receiver.stop()
    got = decode_set(server, receiver.received[0][1], f"http://127.0.0.1:{port}/e")
    assert got["sub_id"]["jti"] == jti
    assert len(await outbox_rows(server, polled["stream_id"])) == PUSH_BATCH + 2
    assert pushed["stream_id"] != polled["stream_id"]


async def test_no_set_without_a_committed_revocation(server: Server) -> None:
    """The SET is written in the revoking transaction: a rolled-back revocation leaves none."""
    stream = await create(server, {"events_requested": [SESSION_REVOKED]})

    class Boom(Exception):
        pass

    queued: list[int] = []

    async def revoke_then_fail() -> None:
        async with server.services.db.transaction() as conn:
            await server.services.revoked.revoke(conn, "rolled-back", "c", int(time.time()) + 60)
            queued.append(len(await outbox_rows_in(conn, stream["stream_id"])))
            raise Boom

    with pytest.raises(Boom):
        await revoke_then_fail()
    assert queued == [1]
    assert await outbox_rows(server, stream["stream_id"]) == []


async def outbox_rows_in(conn: Any, stream_id: str) -> list[Any]:
    rows = await conn.execute(select(ssf_outbox).where(ssf_outbox.c.stream_id == stream_id))
    return list(rows.all())


async def test_mandate_events_are_relayed_to_the_streams_that_asked(server: Server) -> None:
    """A mandate suspended, resumed and revoked: the mandates' CAEP events (RFC 9493 complex subject,
    the mandate as the session) reach a stream asking for both event types, re-signed for it."""
    both = await create(server, {"events_requested": [SESSION_REVOKED, TOKEN_CLAIMS_CHANGE]})
    only_revoked = await create(server, {"events_requested": [SESSION_REVOKED]})
    svc = server.services
    client = await grantee(svc)
    mandate = await svc.mandates.create(terms(client.client_id), actor="test", accepted_by="alice")
    await svc.mandates.suspend(mandate.id, actor="test", reason="review")
    await svc.mandates.resume(mandate.id, actor="test")
    await svc.mandates.revoke(mandate.id, actor="test", reason="ended")
    sets = [
        decode_set(server, t, server.kit.client_id)
        for t in (await poll(server, both))["sets"].values()
    ]
    events = [(next(iter(c["events"])), c["events"][next(iter(c["events"]))]) for c in sets]
    assert [e[0] for e in events] == [TOKEN_CLAIMS_CHANGE, TOKEN_CLAIMS_CHANGE, SESSION_REVOKED]
    assert events[0][1]["claims"] == {"mandate_status": "suspended"}
    assert events[1][1]["claims"] == {"mandate_status": "active"}
    for claims in sets:
        assert claims["sub_id"]["format"] == "complex"
        assert claims["sub_id"]["session"] == {"format": "opaque", "id": mandate.id}
        assert claims["mandate"]["id"] == mandate.id
    only = (await poll(server, only_revoked))["sets"].values()
    assert [
        next(iter(jwt.decode(t, options={"verify_signature": False})["events"])) for t in only
    ] == [SESSION_REVOKED]


@pytest.mark.parametrize("server", [DATABASES[1]], indirect=True)  # SQLite: nothing to hear
async def test_a_set_queued_by_another_process_wakes_the_deliverer_at_its_commit(
    server: Server,
) -> None:
    """PostgreSQL: the queuing transaction announces the SET, so every process's deliverer looks
    at once rather than at its next poll (an hour here). SQLite has no notifications: its
    deliverers poll, so the test runs on PostgreSQL only (no skipped SQLite variant)."""
    assert not server.services.db.is_sqlite
    settings = server.services.settings.model_copy(update={"ssf_push_interval": 3600.0})
    other = Transmitter(
        settings, server.services.db, server.services.keys, OutboundFetcher(OutboundPolicy())
    )
    rounds: list[float] = []

    async def deliver_due() -> int:
        rounds.append(time.monotonic())
        return 1  # one round per wake-up

    other.deliver_due = deliver_due  # type: ignore[method-assign]
    stopping = asyncio.Event()
    running = asyncio.create_task(other.run(stopping))
    try:
        for _ in range(500):  # the listener connects, and looks once to catch up
            if rounds:
                break
            await asyncio.sleep(0.02)
        assert len(rounds) == 1
        url = f"http://127.0.0.1:{free_port()}/events"
        await create(
            server,
            {
                "delivery": {"method": PUSH, "endpoint_url": url},
                "events_requested": [SESSION_REVOKED],
            },
        )
        await revoke_one(server)  # queued in this server's revoking transaction
        for _ in range(500):
            if len(rounds) > 1:
                break
            await asyncio.sleep(0.02)
        assert len(rounds) >= 2
    finally:
        stopping.set()
        other.wake.set()
        await asyncio.wait_for(running, 10)
