"""``IdempotentOperation`` in a FastAPI app served by uvicorn on loopback, driven over HTTP: exact
status codes and problem types, the handler's run count, and the PEP running before every replay."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from tests.pep.conftest import AUDIENCE, ISSUER, FakeIssuer, free_port
from trustplane.authzen.model import Decision, DecisionRequest, Entity
from trustplane.pep import (
    AccessToken,
    IdempotencyService,
    KeyReusedError,
    MalformedKeyError,
    MissingKeyError,
    PolicyEnforcer,
    RequestOutstandingError,
    SqlIdempotencyStore,
    TokenValidator,
    TrustedIssuer,
)
from trustplane.pep.http import Pep
from trustplane.pep.idempotency import fingerprint
from trustplane.pep.idempotency_http import IdempotentOperation, request_path

pytestmark = pytest.mark.e2e
KEY = '"8e03978e-40d5-43e8-bc93-6894a57f9324"'


class NoPdp:
    """The app authenticates only (``pep.token``); a question to the PDP is a test failure."""

    async def decide(
        self,
        subject: Entity,
        action: str,
        resource: Entity,
        context: Mapping[str, Any],
        *,
        correlation_id: str | None = None,
        transaction_id: str | None = None,
    ) -> Decision:
        raise AssertionError("the PDP is not consulted")

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        raise AssertionError("the PDP is not consulted")


class SettlementIn(BaseModel):
    amount_minor: int


@dataclass
class Ledger:
    """The settlement side effect: one entry per execution."""

    entries: list[tuple[str, int]] = field(default_factory=list)
    delay: float = 0.0
    fail_next: bool = False

    async def settle(self, client_id: str, body: SettlementIn) -> Response:
        await asyncio.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("settlement engine down")
        self.entries.append((client_id, body.amount_minor))
        sid = uuid.uuid4().hex
        return JSONResponse({"id": sid}, 201, headers={"Location": f"/settlements/{sid}"})


def build(service: IdempotencyService, issuer: FakeIssuer, ledger: Ledger) -> FastAPI:
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pep = Pep(PolicyEnforcer(validator, NoPdp(), realm="settlement"))
    app = FastAPI()
    pep.install(app)
    idem = IdempotentOperation(service, operation="settlement:submit")

    @app.post("/settlements")
    async def submit(
        request: Request, body: SettlementIn, token: AccessToken = Depends(pep.token)
    ) -> Response:
        return await idem.run(
            request, scope=token.client_id, handler=lambda: ledger.settle(token.client_id, body)
        )

    @app.post("/amounts")
    async def amounts(request: Request, token: AccessToken = Depends(pep.token)) -> Response:
        return await idem.run(request, scope=token.client_id, handler=lambda: (200, {"ok": 1}))

    return app


@dataclass
class Live:
    client: httpx.AsyncClient
    issuer: FakeIssuer
    ledger: Ledger

    async def submit(
        self, amount: int = 100, key: str | None = KEY, client_id: str = "client-1", **headers: str
    ) -> httpx.Response:
        headers["Authorization"] = f"Bearer {self.issuer.token(client_id=client_id)}"
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.client.post(
            "/settlements", json={"amount_minor": amount}, headers=headers
        )


@pytest.fixture
async def live(idempotency_store: SqlIdempotencyStore, issuer: FakeIssuer) -> AsyncIterator[Live]:
    ledger = Ledger()
    app = build(IdempotencyService(idempotency_store), issuer, ledger)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", ws="none", log_level="critical"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task.result()
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
            yield Live(client, issuer, ledger)
    finally:
        server.should_exit = True
        await task


def assert_problem(response: httpx.Response, error: type[Any]) -> None:
    assert response.status_code == error.status
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["type"], problem["title"]) == (error.type_uri, error.title)
    assert problem["status"] == error.status
    assert problem["detail"]


async def test_a_retry_replays_the_stored_response(live: Live) -> None:
    first = await live.submit()
    retry = await live.submit()

    assert first.status_code == 201
    assert "idempotency-replayed" not in first.headers
    assert retry.status_code == 201
    assert retry.headers["idempotency-replayed"] == "true"
    assert retry.content == first.content
    assert retry.headers["content-type"] == first.headers["content-type"] == "application/json"
    assert retry.headers["location"] == first.headers["location"]
    assert live.ledger.entries == [("client-1", 100)]


async def test_another_payload_with_the_same_key_is_422(live: Live) -> None:
    await live.submit(100)
    response = await live.submit(200)

    assert_problem(response, KeyReusedError)
    assert response.json()["title"] == "Idempotency-Key is already used"
    assert live.ledger.entries == [("client-1", 100)]


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (None, MissingKeyError),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", MalformedKeyError),
        ('"unterminated', MalformedKeyError),
        ('""', MalformedKeyError),
    ],
    ids=["missing", "unquoted", "unterminated", "empty"],
)
async def test_missing_or_malformed_key_is_400(live: Live, key: str | None, error: type) -> None:
    response = await live.submit(key=key)

    assert_problem(response, error)
    assert live.ledger.entries == []


async def test_concurrent_requests_execute_once(live: Live) -> None:
    live.ledger.delay = 1.0
    responses = await asyncio.gather(*(live.submit() for _ in range(8)))

    fresh = [
        r for r in responses if r.status_code == 201 and "idempotency-replayed" not in r.headers
    ]
    outstanding = [r for r in responses if r.status_code == 409]
    assert len(fresh) == 1
    assert len(outstanding) >= 1
    for response in outstanding:
        assert_problem(response, RequestOutstandingError)
        assert response.headers["retry-after"] == "1"
    assert all(r in fresh or r in outstanding or r.content == fresh[0].content for r in responses)
    assert live.ledger.entries == [("client-1", 100)]

    replay = await live.submit()
    assert (replay.status_code, replay.content) == (201, fresh[0].content)


async def test_a_failed_execution_is_released_and_executes_again(live: Live) -> None:
    live.ledger.fail_next = True
    failed = await live.submit()
    retry = await live.submit()

    assert failed.status_code == 500
    assert retry.status_code == 201
    assert "idempotency-replayed" not in retry.headers
    assert live.ledger.entries == [("client-1", 100)]


async def test_two_clients_with_one_key_both_execute(live: Live) -> None:
    mine = await live.submit(client_id="client-1")
    theirs = await live.submit(client_id="client-2")

    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert mine.json()["id"] != theirs.json()["id"]
    assert live.ledger.entries == [("client-1", 100), ("client-2", 100)]


async def test_authorization_runs_before_a_replay(live: Live) -> None:
    await live.submit()
    anonymous = await live.client.post(
        "/settlements", json={"amount_minor": 100}, headers={"Idempotency-Key": KEY}
    )

    assert anonymous.status_code == 401
    assert "idempotency-replayed" not in anonymous.headers


async def test_a_tuple_result_and_a_raw_body(live: Live) -> None:
    headers = {
        "Authorization": f"Bearer {live.issuer.token()}",
        "Idempotency-Key": KEY,
        "Content-Type": "application/octet-stream",
    }
    first = await live.client.post("/amounts", content=b"\x00\x01", headers=headers)
    retry = await live.client.post("/amounts", content=b"\x00\x01", headers=headers)
    other_path = await live.client.post("/amounts", content=b"\x00\x02", headers=headers)

    assert (first.status_code, first.json()) == (200, {"ok": 1})
    assert (retry.status_code, retry.json()) == (200, {"ok": 1})
    assert retry.headers["idempotency-replayed"] == "true"
    assert_problem(other_path, KeyReusedError)


# --------------------------------------------------------------------------- the fingerprint's path

PATHS = [
    "/settlements",
    "/trades/T-1/confirm",
    "/a b/é/\u65e5/\udcff",  # decoded bytes, non-ASCII, a lone surrogate (undecodable bytes)
    "/a%3Fb;c=d:e@f!$&'()*+,",
    "/a?b",
    "/a#b",
    "/a\\b",
    "/a\tb/c\r\nd",
    "//double",
    "/",
    "",
    "relative",
]
HOSTS: list[tuple[list[tuple[bytes, bytes]], tuple[str, int] | None]] = [
    ([(b"host", b"svc.example:8443")], None),
    ([], ("127.0.0.1", 8000)),
    ([], ("::1", 443)),
    ([], None),  # no host at all: Starlette's URL is the path alone
    ([(b"host", b"not a host/")], ("10.0.0.1", 80)),  # an invalid Host: the server's address
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("headers", "server"), HOSTS)
def test_the_fingerprint_path_is_starlettes_url_path(
    path: str, headers: list[tuple[bytes, bytes]], server: tuple[str, int] | None
) -> None:
    """The fingerprint hashes ``request.url.path`` as it always did; ``request_path`` skips
    building the URL only where the answer is the same (same fingerprint bytes for the same
    request: a key stored before the change still matches its retry)."""
    scope = {
        "type": "http", "method": "POST", "scheme": "https", "path": path, "query_string": b"x=1",
        "headers": headers, "server": server, "root_path": "",
    }  # fmt: skip
    expected = Request(scope).url.path
    assert request_path(Request(scope)) == expected
    body = b'{"trade": "T-1"}'
    assert fingerprint("POST", request_path(Request(scope)), body) == fingerprint(
        "POST", expected, body
    )
