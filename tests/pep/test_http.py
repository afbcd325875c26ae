"""The FastAPI dependency against the real Cedar decision point (default bundle): exact RFC 6750
status, ``error`` and ``WWW-Authenticate`` for every refusal, and the handler runs only on an allow."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from prometheus_client import REGISTRY

from tests.pep.conftest import AUDIENCE, ISSUER, LEI, FakeIssuer, free_port
from trustplane.authzen.model import Decision, DecisionPoint, DecisionRequest, Entity
from trustplane.limits import BoundedRequests
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import (
    AuthzenClient,
    ClientSecretBasic,
    PolicyEnforcer,
    RevocationCheck,
    TokenValidator,
    TrustedIssuer,
)
from trustplane.pep import enforcer as enforcer_module
from trustplane.pep.http import Grant, Pep
from trustplane.policy.bundle import compile_bundle, default_bundle
from trustplane.policy.engine import PolicyEngine

OTHER_LEI = "529900T8BM49AURSDO55"


@dataclass
class CountingPdp:
    """The real engine, plus a count of the questions it was asked."""

    inner: DecisionPoint
    asked: list[str] = field(default_factory=list)
    transactions: list[str | None] = field(default_factory=list)

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
        self.asked.append(action)
        self.transactions.append(transaction_id)
        return await self.inner.decide(
            subject,
            action,
            resource,
            context,
            correlation_id=correlation_id,
            transaction_id=transaction_id,
        )

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        return await self.inner.decide_many(requests)


def engine() -> PolicyEngine:
    pdp = PolicyEngine(issuer=ISSUER, served_regions=["eu"])
    pdp.activate(compile_bundle(default_bundle()))
    return pdp


async def order_of(request: Request) -> Entity:
    body = await request.json()
    owner = Entity("LegalEntity", body["owner"])
    account = Entity("Account", "ACC-1", {"owner": owner}, (owner,))
    instrument = Entity(
        "Instrument", "XS1", {"instrument_class": "bond", "restricted": body["restricted"]}
    )
    return Entity("Order", "O-1", {"owner": owner, "account": account, "instrument": instrument})


async def context_of(request: Request, _token: Any) -> dict[str, Any]:
    body = await request.json()
    return {
        "data_region": "eu",
        "delegation_depth": 0,
        "amount_minor": body["amount_minor"],
        "currency": "EUR",
        "instrument_class": "bond",
    }


@dataclass
class Harness:
    client: httpx.AsyncClient
    issuer: FakeIssuer
    pdp: CountingPdp
    handled: list[Grant]

    async def order(self, token: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        body = {"owner": LEI, "restricted": False, "amount_minor": 1000}
        body.update(kwargs.pop("body", {}))
        return await self.client.post("/orders", json=body, headers=headers, **kwargs)


def build(
    issuer: FakeIssuer, pdp: DecisionPoint, revocation: RevocationCheck | None = None
) -> tuple[FastAPI, list[Grant]]:
    validator = TokenValidator(
        audience=AUDIENCE,
        issuers=[TrustedIssuer(ISSUER)],
        fetcher=issuer.fetcher(),
        revocation=revocation,
    )
    pep = Pep(PolicyEnforcer(validator, pdp, realm="execution"))
    app = FastAPI()
    pep.install(app)
    handled: list[Grant] = []

    @app.post("/orders")
    async def create_order(
        grant: Grant = Depends(pep.require("order:create", resource=order_of, context=context_of)),
    ) -> dict[str, str]:
        handled.append(grant)
        return {"decision_id": grant.decision.decision_id}

    return app, handled


@pytest.fixture
async def harness(issuer: FakeIssuer) -> AsyncIterator[Harness]:
    pdp = CountingPdp(engine())
    app, handled = build(issuer, pdp)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://rs.test") as client:
        yield Harness(client, issuer, pdp, handled)


def challenge(response: httpx.Response) -> dict[str, str]:
    value = response.headers["www-authenticate"]
    assert value.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


async def test_allowed_request_reaches_the_handler(harness: Harness) -> None:
    response = await harness.order(harness.issuer.token())

    assert response.status_code == 200
    assert response.json()["decision_id"] == harness.handled[0].decision.decision_id
    assert harness.handled[0].decision.reason_ids == ("entity.own",)
    assert harness.handled[0].token.client_id == "client-1"


async def test_the_tokens_txn_goes_to_the_pdp_as_the_transaction(harness: Harness) -> None:
    """So the PDP records the decision in the transaction's chain of authority."""
    with_txn = await harness.order(harness.issuer.token(txn="txn-pep-1"))
    without = await harness.order(harness.issuer.token())
    not_a_string = await harness.order(harness.issuer.token(txn=42))

    assert with_txn.status_code == without.status_code == not_a_string.status_code == 200
    assert harness.pdp.transactions == ["txn-pep-1", None, None]


async def test_missing_token_is_a_bare_challenge(harness: Harness) -> None:
    """RFC 6750 §3.1: no error code when the request carries no authentication."""
    response = await harness.order()

    assert response.status_code == 401
    assert challenge(response) == {"realm": "execution"}
    assert "error" not in response.json()
    assert harness.handled == []


async def test_another_scheme_is_treated_as_no_token(harness: Harness) -> None:
    response = await harness.order(headers={"Authorization": "Basic Y2xpZW50OnNlY3JldA=="})

    assert response.status_code == 401
    assert challenge(response) == {"realm": "execution"}


@pytest.mark.parametrize(
    ("how", "expected_description"),
    [("query", "query string"), ("form", "request body")],
)
async def test_token_outside_the_header_is_refused(
    harness: Harness, how: str, expected_description: str
) -> None:
    token = harness.issuer.token()
    if how == "query":
        response = await harness.client.post(f"/orders?access_token={token}", json={})
    else:
        response = await harness.client.post("/orders", data={"access_token": token})

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert expected_description in response.json()["error_description"]
    assert challenge(response)["error"] == "invalid_request"
    assert harness.handled == []


@pytest.mark.parametrize(
    "query",
    ["access_token={t}", "a=1&access_token={t}", "access%5Ftoken={t}", "%61ccess_token={t}"],
)
async def test_token_in_query_is_refused_even_with_a_valid_header(
    harness: Harness, query: str
) -> None:
    """RFC 6750 §2.3: refused however the field's name is spelled (the check reads the raw query
    first and parses it only if the name could be in it, spelled out or percent-encoded)."""
    token = harness.issuer.token()
    response = await harness.client.post(
        f"/orders?{query.format(t=token)}", json={}, headers={"authorization": f"Bearer {token}"}
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert harness.handled == []


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer a b", 'Bearer ab"c', "Bearer  "],
    ids=["empty", "space", "quote", "blank"],
)
async def test_malformed_header_is_invalid_request(harness: Harness, header: str) -> None:
    response = await harness.order(headers={"Authorization": header})

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_two_authorization_headers_are_invalid_request(harness: Harness) -> None:
    token = harness.issuer.token()
    response = await harness.client.post(
        "/orders",
        json={},
        headers=[("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")],
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_invalid_token_challenge_carries_error_and_description(harness: Harness) -> None:
    response = await harness.order(harness.issuer.token(aud="https://clearing.example/api"))

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    params = challenge(response)
    assert params["error"] == "invalid_token"
    assert params["realm"] == "execution"
    assert "not meant for this resource server" in params["error_description"]
    assert harness.pdp.asked == []


async def test_missing_scope_is_refused_before_the_pdp(harness: Harness) -> None:
    response = await harness.order(harness.issuer.token(scope="order:cancel"))

    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert challenge(response)["scope"] == "order:create"
    assert harness.pdp.asked == []
    assert harness.handled == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"owner": OTHER_LEI}, "default_deny"),
        ({"restricted": True}, "instrument.restricted"),
        ({"amount_minor": 2_000_000_000}, "order.large_ticket_approval"),
    ],
)
async def test_policy_deny_is_insufficient_scope(
    harness: Harness, body: dict[str, Any], reason: str
) -> None:
    before = (
        REGISTRY.get_sample_value(
            "trustplane_pep_refused_total", {"error": "insufficient_scope", "reason": reason}
        )
        or 0.0
    )

    response = await harness.order(harness.issuer.token(), body=body)

    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert "denied by policy" in response.json()["error_description"]
    assert challenge(response)["scope"] == "order:create"
    assert harness.pdp.asked == ["order:create"]
    assert harness.handled == []
    after = REGISTRY.get_sample_value(
        "trustplane_pep_refused_total", {"error": "insufficient_scope", "reason": reason}
    )
    assert after == before + 1


async def test_unreachable_pdp_fails_closed(issuer: FakeIssuer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    fetcher = OutboundFetcher(OutboundPolicy.development())  # the dead PDP is on loopback
    pdp = AuthzenClient(
        dead, token_endpoint=f"{dead}/token", auth=ClientSecretBasic("rs", "s"), fetcher=fetcher
    )
    app, handled = build(issuer, pdp)
    before = REGISTRY.get_sample_value("trustplane_pep_pdp_unavailable_total") or 0.0

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rs") as c:
        response = await c.post(
            "/orders",
            json={"owner": LEI, "restricted": False, "amount_minor": 1},
            headers={"Authorization": f"Bearer {issuer.token()}"},
        )
    await fetcher.aclose()

    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert response.headers["retry-after"] == "1"
    assert handled == []
    assert REGISTRY.get_sample_value("trustplane_pep_pdp_unavailable_total") == before + 1


async def test_unreachable_issuer_fails_closed(harness: Harness) -> None:
    harness.issuer.down = True

    response = await harness.order(harness.issuer.token())

    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert harness.handled == []


# --------------------------------------------------------------------------- revocation


@dataclass
class Introspection:
    active: bool = True
    down: bool = False
    asked: int = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.asked += 1
        assert request.headers["authorization"].startswith("Basic ")
        assert b"token=" in request.content
        if self.down:
            return httpx.Response(500)
        return httpx.Response(200, json={"active": self.active})


async def revocation_harness(
    issuer: FakeIssuer, introspection: Introspection, ttl: float
) -> tuple[httpx.AsyncClient, list[Grant]]:
    fetcher = OutboundFetcher(transport=httpx.MockTransport(introspection.handler))
    check = RevocationCheck(f"{ISSUER}/introspect", ClientSecretBasic("rs", "s"), fetcher, ttl=ttl)
    app, handled = build(issuer, engine(), check)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rs")
    return client, handled


BODY = {"owner": LEI, "restricted": False, "amount_minor": 1}


async def test_revoked_token_is_invalid_token(issuer: FakeIssuer) -> None:
    introspection = Introspection(active=False)
    client, handled = await revocation_harness(issuer, introspection, ttl=10)
    headers = {"Authorization": f"Bearer {issuer.token()}"}

    async with client:
        first = await client.post("/orders", json=BODY, headers=headers)
        second = await client.post("/orders", json=BODY, headers=headers)

    assert first.status_code == second.status_code == 401
    assert first.json()["error_description"] == "the access token has been revoked"
    assert introspection.asked == 1  # an inactive answer is final: kept until the token expires
    assert handled == []


async def test_active_answer_is_reused_within_the_ttl_only(issuer: FakeIssuer) -> None:
    introspection = Introspection(active=True)
    client, handled = await revocation_harness(issuer, introspection, ttl=10)
    headers = {"Authorization": f"Bearer {issuer.token()}"}

    async with client:
        for _ in range(3):
            assert (await client.post("/orders", json=BODY, headers=headers)).status_code == 200
    assert introspection.asked == 1

    expired_cache = Introspection(active=True)
    client, _ = await revocation_harness(issuer, expired_cache, ttl=0)
    async with client:
        for _ in range(3):
            assert (await client.post("/orders", json=BODY, headers=headers)).status_code == 200
    assert expired_cache.asked == 3
    assert len(handled) == 3


async def test_introspection_failure_fails_closed(issuer: FakeIssuer) -> None:
    introspection = Introspection(down=True)
    client, handled = await revocation_harness(issuer, introspection, ttl=10)

    async with client:
        response = await client.post(
            "/orders", json=BODY, headers={"Authorization": f"Bearer {issuer.token()}"}
        )

    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert handled == []


async def test_a_policy_deny_is_logged_with_its_decision(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def info(self, event: str, **fields: Any) -> None:
            logged.append((event, fields))

    # The module's logger may be a cached structlog logger (configured by another test's app), so
    # capture_logs() cannot see it: replace it for this test.
    monkeypatch.setattr(enforcer_module, "log", Recorder())

    response = await harness.order(
        harness.issuer.token(), body={"owner": OTHER_LEI}, headers={"X-Request-ID": "t-9"}
    )

    assert [event for event, _ in logged] == ["pep_refused"]
    fields = logged[0][1]
    assert fields["reason_ids"] == ("default_deny",)
    assert fields["client_id"] == "client-1"
    assert fields["correlation_id"] == "t-9"
    assert fields["decision_id"] in response.json()["error_description"]


async def test_plain_starlette_handler(issuer: FakeIssuer) -> None:
    """Without FastAPI: the dependency is an awaitable of the request; ``install`` renders refusals."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pep = Pep(PolicyEnforcer(validator, engine(), realm="execution"))
    guard = pep.require("order:create", resource=order_of, context=context_of)

    async def create(request: Request) -> JSONResponse:
        grant = await guard(request)
        return JSONResponse({"reasons": list(grant.decision.reason_ids)})

    app = Starlette(routes=[Route("/orders", create, methods=["POST"])])
    pep.install(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rs") as c:
        allowed = await c.post(
            "/orders", json=BODY, headers={"Authorization": f"Bearer {issuer.token()}"}
        )
        refused = await c.post("/orders", json=BODY)

    assert allowed.status_code == 200
    assert allowed.json() == {"reasons": ["entity.own"]}
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'Bearer realm="execution"'


async def test_installed_pep_refuses_a_large_body_before_reading_it(issuer: FakeIssuer) -> None:
    """The form body is read to look for an ``access_token`` (RFC 6750 §2.2) before the token is
    checked: ``install`` bounds it. A declared body over the cap is 413 before a byte is read."""
    app, handled = build(issuer, CountingPdp(engine()))
    read: list[int] = []

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            read.append(len(message.get("body", b"")))
            return message

        await app(scope, counted, send)

    transport = httpx.ASGITransport(app=counting)
    async with httpx.AsyncClient(transport=transport, base_url="http://rs.test") as client:
        big = await client.post(
            "/orders",
            content=b"a=" + b"x" * (64 * 1024),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        flood = await client.post("/orders", json={}, headers={f"x-h{i}": "1" for i in range(150)})
    assert big.status_code == 413
    assert big.headers["content-type"] == "application/problem+json"
    assert big.json()["status"] == 413
    assert sum(read) == 0  # refused on its Content-Length
    assert flood.status_code == 431
    assert handled == []


def test_limits_none_leaves_bounding_to_the_application(issuer: FakeIssuer) -> None:
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pep = Pep(PolicyEnforcer(validator, CountingPdp(engine()), realm="execution"), limits=None)
    app = FastAPI()
    pep.install(app)
    assert not any(m.cls is BoundedRequests for m in app.user_middleware)
    bounded = FastAPI()
    Pep(pep.enforcer).install(bounded)
    assert [m.cls for m in bounded.user_middleware] == [BoundedRequests]
