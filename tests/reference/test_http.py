"""The reference services over HTTP with real tokens (ES256, verified by the PEP SDK against the
issuer's JWKS) and the SDK's idempotency keys: exact statuses and problem types, a replay of the
same request, a duplicate transition under a new key refused 409 naming the first, the events
long-poll resumable by cursor, and the JWKS a consumer verifies with."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import delete

from tests.pep.conftest import AUDIENCE, ISSUER, FakeIssuer
from tests.reference.conftest import (
    MANDATE,
    ORDER,
    Mandates,
    RecordingPdp,
    SplitWorld,
    fresh_store,
)
from trustplane.authzen.model import Decision, Entity
from trustplane.pep import (
    IdempotencyService,
    PolicyEnforcer,
    SqlIdempotencyStore,
    TokenValidator,
    TrustedIssuer,
    serialize_key,
)
from trustplane.pep.http import Pep
from trustplane.pep.idempotency_store import idempotency_keys
from trustplane.reference import machine
from trustplane.reference.http import build_app
from trustplane.reference.services import TradeServices
from trustplane.reference.store import TradeStore

SCOPES = (
    "order:create trade:execute allocation:propose allocation:approve settlement:submit "
    "settlement:confirm report:view exception:view exception:resolve event:subscribe"
)


class AuthzenShape:
    """The PDP as the enforcer sees it (a DecisionPoint), over the recording PDP."""

    def __init__(self, pdp: RecordingPdp) -> None:
        self.pdp, self.transactions = pdp, list[str | None]()

    async def decide(
        self,
        subject: Entity,
        action: str,
        resource: Entity,
        context: Any,
        *,
        correlation_id: str | None = None,
        transaction_id: str | None = None,
    ) -> Decision:
        self.transactions.append(transaction_id)
        return await self.pdp.decide(action, resource, context)

    async def decide_many(self, requests: Any) -> list[Decision]:
        raise NotImplementedError


@dataclass
class Harness:
    client: httpx.AsyncClient
    issuer: FakeIssuer
    store: TradeStore
    pdp: RecordingPdp
    mandates: Mandates
    transactions: list[str | None]

    def headers(self, sub: str = "alice", key: str | None = None, **claims: Any) -> dict[str, str]:
        token = self.issuer.token(
            sub=sub, scope=claims.pop("scope", SCOPES), txn="txn-9", mandate=MANDATE, **claims
        )
        headers = {"Authorization": f"Bearer {token}"}
        if key is not None:
            headers["Idempotency-Key"] = serialize_key(key)
        return headers


@pytest.fixture
async def harness(ref_url: str) -> AsyncIterator[Harness]:
    issuer = FakeIssuer()
    store = await fresh_store(ref_url)
    idem = SqlIdempotencyStore(store.db)
    await idem.create_schema()
    async with store.db.transaction() as conn:  # PostgreSQL: the session's database is shared
        await conn.execute(delete(idempotency_keys))
    pdp, mandates = RecordingPdp(), Mandates()
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    shape = AuthzenShape(pdp)
    pep = Pep(PolicyEnforcer(validator, shape, realm="settlement"))
    app = build_app(TradeServices(store, mandates), pep, IdempotencyService(idem))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ref.test") as client:
        yield Harness(client, issuer, store, pdp, mandates, shape.transactions)
    await store.db.dispose()


async def test_lifecycle_replay_and_duplicate_over_http(harness: Harness) -> None:
    h = harness
    created = await h.client.post("/orders", json=ORDER, headers=h.headers(key="o1"))
    assert created.status_code == 201, created.text
    trade_id = created.json()["trade_id"]
    assert (
        uuid.UUID(trade_id).version == 7
    )  # time-ordered: the stores' keys grow at their right edge
    again = await h.client.post("/orders", json=ORDER, headers=h.headers(key="o1"))
    assert again.status_code == 201
    assert again.json()["trade_id"] == trade_id
    assert again.headers["Idempotency-Replayed"] == "true"

    first = await h.client.post(f"/trades/{trade_id}/execute", headers=h.headers("b", key="e1"))
    assert first.status_code == 200
    assert first.json()["transition"] == "execute"
    replay = await h.client.post(f"/trades/{trade_id}/execute", headers=h.headers("b", key="e1"))
    assert replay.json() == first.json()
    assert replay.headers["Idempotency-Replayed"] == "true"
    dup = await h.client.post(f"/trades/{trade_id}/execute", headers=h.headers("x", key="e2"))
    assert dup.status_code == 409
    assert dup.headers["content-type"] == "application/problem+json"
    body = dup.json()
    assert body["type"].endswith("/duplicate-transition")
    assert body["transition"]["transition"] == "execute"
    assert body["transition"]["actor"] == "b"
    assert body["transition"]["idempotency_key"] == "e1"

    alloc = {"allocations": [{"account": "S1", "quantity": "1000"}]}
    r = await h.client.post(
        f"/trades/{trade_id}/allocation", json=alloc, headers=h.headers("alice", key="p1")
    )
    assert r.status_code == 200
    same = await h.client.post(
        f"/trades/{trade_id}/allocation/approve", headers=h.headers("alice", key="a1")
    )
    assert same.status_code == 403
    assert same.json()["type"].endswith("/four-eyes")
    ok = await h.client.post(
        f"/trades/{trade_id}/allocation/approve", headers=h.headers("bob", key="a2")
    )
    assert ok.status_code == 200

    h.mandates.revoked.add("M-1")
    refused = await h.client.post(
        f"/trades/{trade_id}/settlement",
        json={"instructions": {"ssi": "X"}},
        headers=h.headers("clearing", key="s1"),
    )
    assert refused.status_code == 403
    assert refused.json()["type"].endswith("/settlement-exception")
    exc_id = refused.json()["exception"]["exception_id"]
    listed = await h.client.get("/exceptions?status=open", headers=h.headers("ops"))
    assert [e["exception_id"] for e in listed.json()["exceptions"]] == [exc_id]
    h.mandates.revoked.clear()
    resolved = await h.client.post(
        f"/exceptions/{exc_id}/resolve", json={"action": "reconsent"}, headers=h.headers("ops")
    )
    assert resolved.status_code == 200
    assert resolved.json()["status"] == "resolved"
    submitted = await h.client.post(
        f"/trades/{trade_id}/settlement",
        json={"instructions": {"ssi": "X"}},
        headers=h.headers("clearing", key="s2"),
    )
    assert submitted.status_code == 200, submitted.text

    report = await h.client.get(f"/trades/{trade_id}", headers=h.headers("auditor"))
    assert report.json()["state"] == "settlement_submitted"
    # every PDP question carried the token's txn, so the PDP records it under the transaction
    assert h.transactions
    assert set(h.transactions) == {"txn-9"}


async def test_refusals(harness: Harness) -> None:
    h = harness
    no_key = await h.client.post("/orders", json=ORDER, headers=h.headers())
    assert no_key.status_code == 400
    assert no_key.json()["title"] == "Idempotency-Key is missing"
    no_token = await h.client.post("/orders", json=ORDER)
    assert no_token.status_code == 401
    no_scope = await h.client.post(
        "/orders", json=ORDER, headers=h.headers(key="k", scope="report:view")
    )
    assert no_scope.status_code == 403
    assert no_scope.json()["error"] == "insufficient_scope"
    bad = await h.client.post(
        "/orders",
        content=b"[1]",
        headers={**h.headers(key="k2"), "Content-Type": "application/json"},
    )
    assert bad.status_code == 400
    assert bad.json()["type"].endswith("/invalid-request")
    missing = await h.client.post("/trades/nope/execute", headers=h.headers(key="k3"))
    assert missing.status_code == 404
    assert missing.json()["type"].endswith("/not-found")
    h.pdp.deny.add("trade:create")
    denied = await h.client.post("/orders", json=ORDER, headers=h.headers(key="k4"))
    assert denied.status_code == 403
    assert denied.json()["type"].endswith("/denied")
    wait = await h.client.get("/events?wait=99", headers=h.headers())
    assert wait.status_code == 400


async def test_events_long_poll_by_cursor_verified_with_the_jwks(harness: Harness) -> None:
    h = harness
    empty = await h.client.get("/events?after=0&wait=0", headers=h.headers())
    assert empty.json() == {"events": [], "next": 0}

    async def later() -> None:
        await asyncio.sleep(0.3)
        await h.client.post("/orders", json=ORDER, headers=h.headers(key="o"))

    task = asyncio.create_task(later())
    polled = await h.client.get("/events?after=0&wait=5", headers=h.headers())
    await task
    events = polled.json()["events"]
    assert [e["type"] for e in events] == ["order.created"]
    jwks = (await h.client.get("/jwks")).json()
    claims = jwt.decode(events[0]["jws"], jwt.PyJWK(jwks["keys"][0]).key, algorithms=["ES256"])
    assert claims["envelope"]["txn"] == "txn-9"
    cursor = polled.json()["next"]
    resumed = await h.client.get(f"/events?after={cursor}&wait=0", headers=h.headers())
    assert resumed.json() == {"events": [], "next": cursor}


async def test_racing_duplicate_transitions_over_http_one_wins_the_rest_409(
    harness: Harness,
) -> None:
    h = harness
    created = await h.client.post("/orders", json=ORDER, headers=h.headers(key="o"))
    trade_id = created.json()["trade_id"]
    answers = await asyncio.gather(
        *(
            h.client.post(f"/trades/{trade_id}/execute", headers=h.headers(f"b{i}", key=f"e{i}"))
            for i in range(12)
        )
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [409] * 11
    winner = next(a for a in answers if a.status_code == 200).json()
    for answer in answers:
        if answer.status_code == 409:
            body = answer.json()
            assert body["type"].rsplit("/", 1)[1] in ("duplicate-transition", "out-of-order")
    report = await h.client.get(f"/trades/{trade_id}", headers=h.headers())
    executes = [t for t in report.json()["transitions"] if t["transition"] == "execute"]
    assert executes == [winner]


async def test_exception_api_refusals(harness: Harness) -> None:
    h = harness
    missing = await h.client.post(
        "/exceptions/nope.1/resolve", json={"action": "cancel"}, headers=h.headers()
    )
    assert missing.status_code == 404
    assert missing.json()["type"].endswith("/not-found")
    note = await h.client.post(
        "/exceptions/nope.1/resolve", json={"action": "cancel", "note": 5}, headers=h.headers()
    )
    assert note.status_code == 400
    no_scope = await h.client.get("/exceptions", headers=h.headers(scope="event:subscribe"))
    assert no_scope.status_code == 403
    assert no_scope.json()["error"] == "insufficient_scope"
    status = await h.client.get("/exceptions?status=closed", headers=h.headers())
    assert status.status_code == 400
    cursor = await h.client.get("/events?after=-1", headers=h.headers())
    assert cursor.status_code == 400


async def test_the_split_services_over_http(split: SplitWorld) -> None:
    """Each service on its own store behind one app: every route on its owner's store (its
    Idempotency-Keys there too), the hand-off before each answer (a sequential client finds its
    step downstream at once), ``GET /events`` the reporting store's feed of every owner's events,
    each verified with ``GET /jwks`` (the three owners' keys), a duplicate refused for ever."""
    issuer, stores = FakeIssuer(), split.stores
    idempotency = {}
    for owner in machine.OWNERS:
        keys = SqlIdempotencyStore(stores.by_service()[owner].db)
        await keys.create_schema()
        async with stores.by_service()[owner].db.transaction() as conn:
            await conn.execute(delete(idempotency_keys))
        idempotency[owner] = IdempotencyService(keys)
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pep = Pep(PolicyEnforcer(validator, AuthzenShape(split.pdp), realm="settlement"))
    app = build_app(split.services, pep, idempotency)

    def headers(sub: str, key: str | None = None) -> dict[str, str]:
        token = issuer.token(sub=sub, scope=SCOPES, txn="txn-9", mandate=MANDATE)
        found = {"Authorization": f"Bearer {token}"}
        if key is not None:
            found["Idempotency-Key"] = serialize_key(key)
        return found

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ref.test") as client:
        created = await client.post("/orders", json=ORDER, headers=headers("alice", "o"))
        trade_id = created.json()["trade_id"]
        steps = [
            ("execute", None, "broker"),
            ("allocation", {"allocations": [{"account": "S", "quantity": "1000"}]}, "alice"),
            ("allocation/approve", None, "bob"),
            ("settlement", {"instructions": {"ssi": "X"}}, "clearing"),
            ("settlement/confirm", {"outcome": "settled"}, "clearing"),
        ]
        for path, body, sub in steps:
            moved = await client.post(
                f"/trades/{trade_id}/{path}", json=body, headers=headers(sub, path)
            )
            assert moved.status_code == 200, (path, moved.text)
        dup = await client.post(f"/trades/{trade_id}/execute", headers=headers("x", "new"))
        assert dup.status_code == 409
        assert dup.json()["transition"]["idempotency_key"] == "execute"
        report = (await client.get(f"/trades/{trade_id}", headers=headers("auditor"))).json()
        assert report["state"] == machine.SETTLED
        feed = (await client.get("/events?after=0", headers=headers("auditor"))).json()
        jwks = (await client.get("/jwks")).json()
    assert len(jwks["keys"]) == 3
    keys = {k["kid"]: jwt.PyJWK(k).key for k in jwks["keys"]}
    types = []
    for event in feed["events"]:
        kid = jwt.get_unverified_header(event["jws"])["kid"]
        types.append(jwt.decode(event["jws"], keys[kid], algorithms=["ES256"])["type"])
    assert types == [
        "order.created", "trade.executed", "allocation.proposed", "allocation.approved",
        "settlement.submitted", "settlement.settled",
    ]  # fmt: skip
    for owner, operations in (
        (machine.EXECUTION, 3),  # order, execute, and the duplicate's 409 under its new key
        (machine.ALLOCATION, 2),
        (machine.SETTLEMENT, 2),
    ):
        async with stores.by_service()[owner].db.read() as conn:
            rows = (await conn.execute(idempotency_keys.select())).all()
        assert len(rows) == operations, owner


async def test_the_transitions_are_starlette_routes_without_fastapi_s_parameter_solving(
    ref_url: str,
) -> None:
    """Every POST route (a transition: the hot path) is Starlette's own ``Route``: its handler
    reads the request itself, so FastAPI's dependency and parameter solving is not run per step."""
    from fastapi.routing import APIRoute
    from starlette.routing import Route

    store = await fresh_store(ref_url)
    validator = TokenValidator(audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)])
    pep = Pep(PolicyEnforcer(validator, AuthzenShape(RecordingPdp()), realm="settlement"))
    idempotency = IdempotencyService(SqlIdempotencyStore(store.db))
    app = build_app(TradeServices(store, Mandates()), pep, idempotency)
    posts = [r for r in app.routes if isinstance(r, Route) and "POST" in (r.methods or ())]
    paths = {r.path for r in posts if not isinstance(r, APIRoute)}
    assert "/orders" in paths
    assert "/trades/{trade_id}/settlement" in paths
    assert {r.path for r in posts if isinstance(r, APIRoute)} == {
        "/exceptions/{exception_id}/resolve"
    }
    await store.db.dispose()
