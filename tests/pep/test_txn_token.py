"""The PEP with Transaction Tokens (draft-ietf-oauth-transaction-tokens-10): the ``Txn-Token``
header beside the access token, over HTTP through the FastAPI dependency. Tokens are minted by PyJWT
(tests.pep.conftest), independently of trustplane's JOSE code; every refusal is asserted with its
status, ``error`` and description, and the PDP must see ``tctx`` in the decision context."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI, Request

from tests.pep.conftest import AUDIENCE, ISSUER, LEI, FakeIssuer
from trustplane.authzen.model import Decision, DecisionRequest, Entity
from trustplane.pep import (
    ConfigurationError,
    PolicyEnforcer,
    TokenValidator,
    TrustedIssuer,
    TxnTokenValidator,
)
from trustplane.pep.http import Grant, Pep

TRUST_DOMAIN = "https://as.example"
CHAIN = "Txn-Token: req_wl_chain must list strings, ending with req_wl"
TCTX = {"type": "trade_instruction", "action": "create_order", "account": "ACC-1",
        "quantity": 10, "authorization_details_digest": "ab" * 32}  # fmt: skip


@dataclass
class RecordingPdp:
    """Allows everything and records each decision context (the PDP's view of the request)."""

    contexts: list[Mapping[str, Any]] = field(default_factory=list)

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
        self.contexts.append(context)
        return Decision(True, ("test_allow",), "test", uuid.uuid4().hex)

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        raise NotImplementedError


def txn_token(issuer: FakeIssuer, *, typ: str | None = "txntoken+jwt", **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": TRUST_DOMAIN,
        "iat": now,
        "exp": now + 60,
        "txn": "txn-1",
        "sub": "client-1",
        "scope": "order:create",
        "req_wl": "gateway",
        "tctx": TCTX,
        "rctx": {"req_ip": "192.0.2.1"},
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name)
        else:
            claims[name] = value
    return jwt.encode(
        claims, issuer.keys["k1"], algorithm="ES256", headers={"typ": typ, "kid": "k1"}
    )


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def unsigned(payload: bytes) -> str:
    """A compact JWS with a raw payload and a junk signature (never verified: parsing refuses it)."""
    header = b'{"alg":"ES256","typ":"txntoken+jwt","kid":"k1"}'
    parts = [
        base64.urlsafe_b64encode(p).rstrip(b"=").decode() for p in (header, payload, b"s" * 64)
    ]
    return ".".join(parts)


@dataclass
class Harness:
    client: httpx.AsyncClient
    issuer: FakeIssuer
    pdp: RecordingPdp
    handled: list[Grant]

    async def call(self, path: str, txn: str | None, access: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {access or self.issuer.token(txn='txn-1')}"}
        if txn is not None:
            headers["Txn-Token"] = txn
        return await self.client.post(path, headers=headers)


@pytest.fixture
async def harness(issuer: FakeIssuer) -> AsyncIterator[Harness]:
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pdp = RecordingPdp()
    pep = Pep(
        PolicyEnforcer(validator, pdp, realm="execution"),
        txn_tokens=TxnTokenValidator(validator, trust_domain=TRUST_DOMAIN),
    )
    app = FastAPI()
    pep.install(app)
    handled: list[Grant] = []

    async def order(_request: Request) -> Entity:
        return Entity("Order", "O-1")

    async def context(_request: Request, _token: Any) -> dict[str, Any]:
        return {"data_region": "eu"}

    @app.post("/orders")
    async def create_order(
        grant: Grant = Depends(
            pep.require("order:create", resource=order, context=context, txn_token=True)
        ),
    ) -> dict[str, Any]:
        handled.append(grant)
        assert grant.txn_token is not None
        return {"tctx": grant.txn_token.tctx, "txn": grant.txn_token.txn}

    @app.post("/quotes")
    async def quote(
        grant: Grant = Depends(pep.require("order:create", resource=order, context=context)),
    ) -> dict[str, Any]:
        handled.append(grant)
        return {"txn_token": grant.txn_token is not None}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://rs.test") as client:
        yield Harness(client, issuer, pdp, handled)
    await validator.aclose()


def refusal(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert response.headers["www-authenticate"].startswith("Bearer ")
    return response.status_code, body["error"], body["error_description"]


async def test_valid_txn_token_reaches_handler_and_pdp(harness: Harness) -> None:
    header = txn_token(harness.issuer)
    response = await harness.call("/orders", header)
    assert response.status_code == 200, response.text
    assert response.json() == {"tctx": TCTX, "txn": "txn-1"}
    assert harness.pdp.contexts[-1] == {"data_region": "eu", "tctx": TCTX}
    grant = harness.handled[-1]
    assert grant.txn_token is not None
    # draft §12.2: outbound calls carry the Txn-Token as received, unmodified
    assert grant.txn_token.token == header
    assert grant.txn_token.req_wl == ("gateway",)
    assert grant.txn_token.rctx == {"req_ip": "192.0.2.1"}


async def test_access_token_without_txn_accepts_any_txn(harness: Harness) -> None:
    access = harness.issuer.token()
    response = await harness.call("/orders", txn_token(harness.issuer, txn="other"), access)
    assert response.status_code == 200, response.text


async def test_optional_route_without_header(harness: Harness) -> None:
    response = await harness.call("/quotes", None)
    assert response.status_code == 200
    assert response.json() == {"txn_token": False}
    assert "tctx" not in harness.pdp.contexts[-1]


async def test_optional_route_still_refuses_a_bad_header(harness: Harness) -> None:
    response = await harness.call("/quotes", txn_token(harness.issuer, typ="JWT"))
    assert refusal(response)[:2] == (401, "invalid_token")
    assert harness.handled == []


@pytest.mark.parametrize(
    ("make", "description"),
    [
        (lambda i: None, "Txn-Token: this operation requires a Txn-Token header"),
        (lambda i: txn_token(i, typ="at+jwt"), "Txn-Token: typ must be txntoken+jwt"),
        (lambda i: txn_token(i, typ="JWT"), "Txn-Token: typ must be txntoken+jwt"),
        (lambda i: txn_token(i, exp=int(time.time()) - 120), "Txn-Token: expired"),
        # its own tolerance (5 s), not the access token's 60 s: a 60 s token must not live 120 s
        (lambda i: txn_token(i, exp=int(time.time()) - 30), "Txn-Token: expired"),
        (lambda i: txn_token(i, iat=int(time.time()) + 30), "Txn-Token: issued in the future"),
        (
            lambda i: txn_token(i, aud="https://other.example"),
            "Txn-Token: aud is not this trust domain",
        ),
        (lambda i: txn_token(i, aud=AUDIENCE), "Txn-Token: aud is not this trust domain"),
        (lambda i: txn_token(i, aud=None), "Txn-Token: aud is not this trust domain"),
        (lambda i: txn_token(i, txn="txn-2"), "Txn-Token: txn differs from the access token's txn"),
        (
            lambda i: txn_token(i, sub="mallory"),
            "Txn-Token: sub differs from the access token's sub",
        ),
        (lambda i: txn_token(i, txn=None), "Txn-Token: txn and sub are required"),
        (
            lambda i: txn_token(i, scope="order:create admin"),
            "Txn-Token: scope exceeds the access token's scope",
        ),
        (
            lambda i: txn_token(i, iss="https://evil.example"),
            "Txn-Token: not issued by the access token's issuer",
        ),
        (lambda i: txn_token(i, tctx=[1]), "Txn-Token: tctx and rctx must be JSON objects"),
        (lambda i: txn_token(i, rctx="ip"), "Txn-Token: tctx and rctx must be JSON objects"),
        (lambda i: "not.a.jws", None),
        # draft §9.1: typ MUST be present
        (lambda i: txn_token(i, typ=None), "Txn-Token: typ must be txntoken+jwt"),
        # draft §9.2: iat, exp, sub, scope and req_wl are REQUIRED (scope and req_wl: strings)
        (lambda i: txn_token(i, iat=None), "Txn-Token: exp and iat must be numeric dates"),
        (lambda i: txn_token(i, exp=None), "Txn-Token: exp and iat must be numeric dates"),
        (lambda i: txn_token(i, exp="never"), "Txn-Token: exp and iat must be numeric dates"),
        (lambda i: txn_token(i, sub=None), "Txn-Token: txn and sub are required"),
        (lambda i: txn_token(i, txn=7), "Txn-Token: txn and sub are required"),
        (lambda i: txn_token(i, scope=None), "Txn-Token: scope is required"),
        (lambda i: txn_token(i, scope=""), "Txn-Token: scope is required"),
        (lambda i: txn_token(i, scope=["order:create"]), "Txn-Token: scope is required"),
        (lambda i: txn_token(i, req_wl=None), "Txn-Token: req_wl is required (a string)"),
        (lambda i: txn_token(i, req_wl=["gw", "svc"]), "Txn-Token: req_wl is required (a string)"),
        (lambda i: txn_token(i, req_wl_chain="gw"), CHAIN),
        (lambda i: txn_token(i, req_wl_chain=["gateway", "other"]), CHAIN),
        # bounded: a signed but deeply nested tctx never reaches the PDP
        (lambda i: txn_token(i, tctx=nested(40)), "Txn-Token: tctx and rctx nest too deeply"),
        (lambda i: txn_token(i, rctx=nested(40)), "Txn-Token: tctx and rctx nest too deeply"),
        # draft §12.1: exactly one Txn-Token in the header
        (lambda i: f"{txn_token(i)},{txn_token(i)}", "Txn-Token: malformed: not a compact JWS"),
        # media type registration: the signature is verified; alg none never is
        (
            lambda i: jwt.encode(
                jwt.decode(txn_token(i), options={"verify_signature": False}),
                None,
                algorithm="none",
                headers={"typ": "txntoken+jwt"},
            ),
            "Txn-Token: malformed: algorithm 'none' is not allowed",
        ),
        (
            lambda i: unsigned(b"[" * 5000 + b"]" * 5000),
            "Txn-Token: malformed: payload is not JSON",
        ),
        (lambda i: unsigned(b"[1]"), "Txn-Token: malformed: payload is not a JSON object"),
    ],
)
async def test_bad_txn_token_is_invalid_token(
    harness: Harness, make: Any, description: str | None
) -> None:
    response = await harness.call("/orders", make(harness.issuer))
    status, error, text = refusal(response)
    assert (status, error) == (401, "invalid_token")
    if description is not None:
        assert text == description
    else:
        assert text.startswith("Txn-Token: malformed")
    assert harness.handled == []
    assert harness.pdp.contexts == []


async def test_a_txn_token_within_its_clock_tolerance_is_accepted(harness: Harness) -> None:
    now = int(time.time())
    response = await harness.call("/orders", txn_token(harness.issuer, exp=now - 2, iat=now + 2))
    assert response.status_code == 200, response.text


def test_the_txn_token_tolerance_is_never_the_access_tokens_and_never_negative() -> None:
    validator = TokenValidator(audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], clock_skew=3)
    assert TxnTokenValidator(validator, trust_domain=TRUST_DOMAIN).clock_skew == 3
    assert TxnTokenValidator(validator, trust_domain=TRUST_DOMAIN, clock_skew=1).clock_skew == 1
    with pytest.raises(ConfigurationError, match="clock_skew"):
        TxnTokenValidator(validator, trust_domain=TRUST_DOMAIN, clock_skew=-1)


async def test_signature_by_another_key(harness: Harness) -> None:
    good = txn_token(harness.issuer)
    harness.issuer.add_key("k2")
    forged = jwt.encode(
        jwt.decode(good, options={"verify_signature": False}),
        harness.issuer.keys["k2"],
        algorithm="ES256",
        headers={"typ": "txntoken+jwt", "kid": "k1"},
    )
    response = await harness.call("/orders", forged)
    assert refusal(response) == (401, "invalid_token", "Txn-Token: the signature does not verify")


async def test_tampered_tctx_does_not_verify(harness: Harness) -> None:
    """A workload widening the tctx of the token it received (quantity 10 -> 10,000) keeps the
    signature of the original: refused."""
    good = txn_token(harness.issuer)
    header, _payload, signature = good.split(".")
    claims = jwt.decode(good, options={"verify_signature": False})
    claims["tctx"] = {**claims["tctx"], "quantity": 10_000}
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    forged = f"{header}.{forged_payload.decode()}.{signature}"
    response = await harness.call("/orders", forged)
    assert refusal(response) == (401, "invalid_token", "Txn-Token: the signature does not verify")
    assert harness.pdp.contexts == []


async def test_unknown_claims_are_ignored(harness: Harness) -> None:
    """Draft §9.2: recipients MUST ignore claims they do not understand."""
    token = txn_token(harness.issuer, x_vendor={"anything": [1, 2]}, azd="legacy")
    response = await harness.call("/orders", token)
    assert response.status_code == 200, response.text


async def test_replacement_chain_is_read(harness: Harness) -> None:
    token = txn_token(harness.issuer, req_wl="svc", req_wl_chain=["gateway", "svc"])
    response = await harness.call("/orders", token)
    assert response.status_code == 200, response.text
    grant = harness.handled[-1]
    assert grant.txn_token is not None
    assert grant.txn_token.req_wl == ("gateway", "svc")


async def test_txn_token_is_not_an_access_token(harness: Harness) -> None:
    """Draft §12 and §13.13: a Txn-Token never travels in Authorization, and is no access token."""
    token = txn_token(harness.issuer)
    response = await harness.client.post("/orders", headers={"Authorization": f"Bearer {token}"})
    assert refusal(response) == (
        401,
        "invalid_token",
        "the token is not an access token (typ must be at+jwt)",
    )
    assert harness.handled == []


async def test_txn_token_alone_authenticates_nobody(harness: Harness) -> None:
    """Draft §13.12: a Txn-Token is no authentication credential: without an access token the
    request is unauthenticated (RFC 6750 §3.1: 401, a bare challenge)."""
    response = await harness.client.post(
        "/orders", headers={"Txn-Token": txn_token(harness.issuer)}
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="execution"'
    assert "error" not in response.json()
    assert harness.handled == []
    assert harness.pdp.contexts == []


async def test_txn_tokens_are_not_logged(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Draft §15.2: a complete Txn-Token is never logged, whether accepted or refused."""
    from trustplane.pep import enforcer as enforcer_module

    logged: list[tuple[str, str, dict[str, Any]]] = []

    class Recorder:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **fields: logged.append((level, event, fields))

    monkeypatch.setattr(enforcer_module, "log", Recorder())
    good, foreign = txn_token(harness.issuer), txn_token(harness.issuer, aud="https://x.example")
    await harness.call("/orders", good)
    await harness.call("/orders", foreign)
    await harness.client.post("/orders", headers={"Authorization": f"Bearer {good}"})
    assert [event for _, event, _ in logged] == ["pep_refused"]  # the Bearer Txn-Token
    for token in (good, foreign):
        assert token.split(".")[2] not in repr(logged)


async def test_two_headers_are_refused(harness: Harness) -> None:
    token = txn_token(harness.issuer)
    access = harness.issuer.token(txn="txn-1")
    response = await harness.client.post(
        "/orders",
        headers=[("Authorization", f"Bearer {access}"), ("Txn-Token", token), ("Txn-Token", token)],
    )
    assert refusal(response) == (401, "invalid_token", "Txn-Token: more than one Txn-Token header")


def test_required_without_validator_is_a_configuration_error(issuer: FakeIssuer) -> None:
    validator = TokenValidator(audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)])
    pep = Pep(PolicyEnforcer(validator, RecordingPdp(), realm="execution"))
    with pytest.raises(ConfigurationError):
        pep.require("order:create", resource=lambda r: Entity("Order", "O"), txn_token=True)


async def test_default_bundle_accepts_tctx_in_the_context(issuer: FakeIssuer) -> None:
    """The real Cedar engine with the default bundle: the schema declares ``tctx`` (TxnContext), so
    a request carrying a Txn-Token is decided on its merits, not refused for an unknown attribute."""
    from tests.pep.test_http import context_of, engine, order_of

    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pep = Pep(
        PolicyEnforcer(validator, engine(), realm="execution"),
        txn_tokens=TxnTokenValidator(validator, trust_domain=TRUST_DOMAIN),
    )
    app = FastAPI()
    pep.install(app)

    @app.post("/orders")
    async def create_order(
        grant: Grant = Depends(
            pep.require("order:create", resource=order_of, context=context_of, txn_token=True)
        ),
    ) -> dict[str, bool]:
        return {"allowed": grant.decision.allowed}

    tctx = {**TCTX, "amount": {"amount": 1000, "currency": "EUR", "minor_units": 2}}
    body = {"owner": LEI, "restricted": False, "amount_minor": 1000}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://rs.test") as client:
        response = await client.post(
            "/orders",
            json=body,
            headers={
                "Authorization": f"Bearer {issuer.token(txn='txn-1')}",
                "Txn-Token": txn_token(issuer, tctx=tctx),
            },
        )
    await validator.aclose()
    assert response.status_code == 200, response.text
    assert response.json() == {"allowed": True}


async def test_a_refusal_quoting_the_token_keeps_to_the_allowed_characters(
    harness: Harness,
) -> None:
    """RFC 6750 §3: ``error_description`` holds %x20-21 / %x23-5B / %x5D-7E only, in the body as in
    the challenge, though the description quotes what the Txn-Token's header carried."""
    header = base64.urlsafe_b64encode('{"alg":"\u00e9\\"\\\\","typ":"txntoken+jwt"}'.encode())
    raw = ".".join([header.rstrip(b"=").decode(), "e30", "c2ln"])
    response = await harness.call("/orders", raw)
    status, error, text = refusal(response)
    assert (status, error) == (401, "invalid_token")
    assert text.startswith("Txn-Token: malformed: algorithm "), text
    assert re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]+", text), text
