"""Transaction Tokens (draft-ietf-oauth-transaction-tokens-10) at the token endpoint: the issued
Txn-Token verified by PyJWT with the server's JWKS, the replacement rules, and every refusal with
its exact status and error code (one test per MUST of the draft that binds the Txn-Token service:
docs/token_exchange.md, "Conformance")."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import orjson
import pytest
import pytest_asyncio
from pydantic import ValidationError

from tests.conftest import (
    EXECUTION,
    LEI,
    PROTOCOL_DATABASES,
    ClientKit,
    jwks_for,
    make_settings,
    new_ec_key,
    register_kit,
)
from tests.mandates.conftest import DETAILS_TYPES
from tests.protocol_server import Server, running_server
from tests.rar.test_registry import TRADE
from trustplane.audit.sink import recent_events
from trustplane.clients.metadata import validate_metadata
from trustplane.errors import InvalidClientMetadataError
from trustplane.oauth.exchange import TOKEN_EXCHANGE
from trustplane.oauth.exchange.txn_token import TOKEN_TYPE_TXN_TOKEN, TXN_TOKEN_TYP
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
ORDER: dict[str, Any] = {
    "type": "trade_instruction",
    "action": "create_order",
    "order_id": "ORD-1",
    "trade_id": "TRD-1",
    "side": "buy",
    "quantity": 1000,
    "amount": {"amount": 100_000_00, "currency": "EUR", "minor_units": 2},
    "instrument": "US0378331005",
    "venue": "XLON",
    "account": "ACC-1",
    "approval": "approved",
    "origin": "manual",
}


def b64(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


@dataclass
class Txn:
    server: Server
    app: ClientKit  # the external client the access token was issued to
    gateway: ClientKit  # the workload allowed to request Txn-Tokens
    plain: ClientKit  # token exchange allowed, Txn-Tokens not
    relay: ClientKit  # a second workload allowed to request Txn-Tokens
    jwks: jwt.PyJWKSet

    def access(self, **extra: Any) -> str:
        return issue_access_token(
            self.server.services.keys.ring,
            issuer=self.server.issuer,
            subject="alice",
            client_id=self.app.client_id,
            audience=EXECUTION,
            scopes=("order:create", "order:cancel"),
            lifetime=300,
            extra={"lei": LEI, "txn": "txn-42", "authorization_details": [TRADE], **extra},
        ).token

    async def post(
        self,
        subject_token: str | None,
        kit: ClientKit | None = None,
        subject_token_type: str | None = ACCESS,
        **form: Any,
    ) -> httpx.Response:
        """A Txn-Token request (draft §11.1: ``audience`` and ``scope`` are REQUIRED: sent unless
        given as None, like any parameter here)."""
        data = {
            "grant_type": TOKEN_EXCHANGE,
            "requested_token_type": TOKEN_TYPE_TXN_TOKEN,
            "subject_token": subject_token,
            "subject_token_type": subject_token_type,
            "audience": self.server.issuer,
            "scope": "order:create",
            **(kit or self.gateway).auth(),
            **form,
        }
        sent = {name: value for name, value in data.items() if value is not None}
        return await self.server.http.post("/token", data=sent)

    async def first(self, **form: Any) -> str:
        response = await self.post(self.access(), request_details=b64(ORDER), **form)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def verify(self, token: str, audience: str | None = None) -> dict[str, Any]:
        """PyJWT, independently: signature with the server's JWKS, aud, exp, iss, typ."""
        header = jwt.get_unverified_header(token)
        assert header["typ"] == TXN_TOKEN_TYP
        key = self.jwks[header["kid"]]
        return dict(
            jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                audience=audience or self.server.issuer,
                issuer=self.server.issuer,
                options={"require": ["exp", "iat", "aud", "txn", "sub", "scope", "req_wl"]},
            )
        )


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROTOCOL_DATABASES)
async def tx(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Txn]:
    async with running_server(request, tmp_path_factory) as server:
        svc = server.services
        grants = ["client_credentials", TOKEN_EXCHANGE]
        app = await register_kit(svc, grant_types=grants, authorization_details_types=DETAILS_TYPES)
        gateway = await register_kit(svc, grant_types=grants, txn_token_requester=True)
        plain = await register_kit(svc, grant_types=grants)
        second = await register_kit(svc, grant_types=grants, txn_token_requester=True)
        jwks = jwt.PyJWKSet.from_dict((await server.http.get("/jwks")).json())
        yield Txn(server, app, gateway, plain, second, jwks)


def forged(token: str, **changes: Any) -> str:
    """``token`` with claims changed and its original signature kept."""
    header, _payload, signature = token.split(".")
    claims = {**jwt.decode(token, options={"verify_signature": False}), **changes}
    return f"{header}.{b64(claims)}.{signature}"


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_json(depth: int) -> str:
    """JSON text nested ``depth`` objects deep (beyond what orjson writes, within what it reads)."""
    return '{"a":' * depth + '"x"' + "}" * depth


async def test_issue_txn_token(tx: Txn) -> None:
    response = await tx.post(
        tx.access(),
        scope="order:create",
        request_details=b64(ORDER),
        request_context=b64({"req_ip": "192.0.2.7", "authn": "urn:trustplane:authn:pkjwt"}),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == TOKEN_TYPE_TXN_TOKEN
    assert body["token_type"] == "N_A"
    assert 0 < body["expires_in"] <= 60
    claims = tx.verify(body["access_token"])
    assert claims["txn"] == "txn-42"
    assert claims["sub"] == "alice"
    assert claims["scope"] == "order:create"
    assert claims["req_wl"] == tx.gateway.client_id
    assert "req_wl_chain" not in claims
    assert abs(claims["iat"] - time.time()) <= 5  # §11.3: iat is the time of issuance
    assert claims["exp"] - claims["iat"] == 60
    assert "refresh_token" not in body  # §11.4 and §13.3
    # §13.4: the Txn-Token never contains the access token it was made from
    payload = base64.urlsafe_b64decode(body["access_token"].split(".")[1] + "==")
    assert tx.access().split(".")[2].encode() not in payload
    tctx = claims["tctx"]
    assert {k: tctx[k] for k in ORDER} == ORDER
    digest = hashlib.sha256(orjson.dumps([TRADE], option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert tctx["authorization_details_digest"] == digest
    assert claims["rctx"] == {
        "req_ip": "192.0.2.7",
        "authn": "urn:trustplane:authn:pkjwt",
        "client_id": tx.app.client_id,
        "lei": LEI,
    }
    events = await recent_events(tx.server.services.db, 20, "oauth:token:issued")
    (event,) = [e for e in events if e["jti"] == claims["jti"]]
    assert event["transaction_id"] == "txn-42"
    assert event["authorization_details_digest"] == digest


async def test_raw_json_parameters_and_new_txn(tx: Txn) -> None:
    token = issue_access_token(
        tx.server.services.keys.ring,
        issuer=tx.server.issuer,
        subject="bob",
        client_id=tx.app.client_id,
        audience=EXECUTION,
        scopes=("order:create",),
        lifetime=300,
        extra={"authorization_details": [TRADE]},
    ).token
    response = await tx.post(token, request_details=orjson.dumps(ORDER).decode())
    assert response.status_code == 200, response.text
    claims = tx.verify(response.json()["access_token"])
    assert isinstance(claims["txn"], str)
    assert len(claims["txn"]) >= 16
    assert claims["scope"] == "order:create"


async def test_replacement_keeps_txn_and_narrows(tx: Txn) -> None:
    first = await tx.first()
    narrower = {"quantity": 400, "amount": {**ORDER["amount"], "amount": 40_000_00}}
    response = await tx.post(
        first,
        kit=tx.relay,
        subject_token_type=TOKEN_TYPE_TXN_TOKEN,
        scope="order:create",
        request_details=b64(narrower),
    )
    assert response.status_code == 200, response.text
    before, after = tx.verify(first), tx.verify(response.json()["access_token"])
    assert after["txn"] == before["txn"] == "txn-42"
    assert after["sub"] == before["sub"]
    assert after["tctx"]["quantity"] == 400
    assert after["tctx"]["order_id"] == "ORD-1"
    assert (
        after["tctx"]["authorization_details_digest"]
        == before["tctx"]["authorization_details_digest"]
    )
    # §9.2: req_wl is a string, the workload that requested this token; §13.15: the call chain of
    # the workloads before it is kept (req_wl_chain, oldest first)
    assert after["req_wl"] == tx.relay.client_id
    assert after["req_wl_chain"] == [tx.gateway.client_id, tx.relay.client_id]
    assert after["exp"] <= before["exp"]
    assert after["aud"] == before["aud"] == tx.server.issuer
    assert after["rctx"] == before["rctx"]
    again = await tx.post(response.json()["access_token"], subject_token_type=TOKEN_TYPE_TXN_TOKEN)
    assert again.status_code == 200, again.text
    third = tx.verify(again.json()["access_token"])
    assert third["txn"] == "txn-42"
    assert third["req_wl"] == tx.gateway.client_id
    assert third["req_wl_chain"] == [*after["req_wl_chain"], tx.gateway.client_id]
    assert third["tctx"]["quantity"] == 400


@pytest.mark.parametrize(
    "widening",
    [
        {"quantity": 1001},
        {"amount": {**ORDER["amount"], "amount": 100_000_01}},
        {"amount": {**ORDER["amount"], "currency": "USD"}},
        {"side": "sell"},
        {"venue": "XETR"},
        {"settlement_id": "S-1"},
        {"authorization_details_digest": "0" * 64},
        # tampered attempts: other JSON types, extra or missing members, deep values
        {"quantity": True},
        {"quantity": 400.0},
        {"quantity": "400"},
        {"quantity": 0},
        {"quantity": 2**63},
        {"amount": {**ORDER["amount"], "amount": 1, "note": "x"}},
        {"amount": {"amount": 1, "currency": "EUR"}},
        {"amount": {"amount": 1, "currency": "EUR", "minor_units": 0}},
        {"amount": [1, "EUR", 2]},
        {"amount": {**ORDER["amount"], "amount": nested(200)}},
        {"type": "settlement_instruction"},
        {"account": None},
        {"order_id": nested(200)},
        {"txn": "txn-other"},
        {"sub": "mallory"},
        {"aud": "https://other.example"},
    ],
)
async def test_replacement_cannot_widen_tctx(tx: Txn, widening: dict[str, Any]) -> None:
    first = await tx.first()
    response = await tx.post(
        first, subject_token_type=TOKEN_TYPE_TXN_TOKEN, request_details=b64(widening)
    )
    assert error_of(response) == (400, "invalid_request")
    assert "only narrow tctx" in response.json()["error_description"]


async def test_replacement_cannot_be_forged(tx: Txn) -> None:
    """§13.15: a workload cannot widen the Txn-Token it holds by editing it: a changed claim breaks
    the signature, and a token signed by another key under our kid is not ours."""
    first = await tx.first()
    quantity = {**tx.verify(first)["tctx"], "quantity": 10**6}
    attempts = [
        forged(first, tctx=quantity),
        forged(first, txn="txn-other"),
        forged(first, scope="order:create order:cancel"),
        forged(first, exp=int(time.time()) + 3600),
        jwt.encode(
            jwt.decode(first, options={"verify_signature": False}),
            new_ec_key(),
            algorithm="ES256",
            headers={"typ": TXN_TOKEN_TYP, "kid": jwt.get_unverified_header(first)["kid"]},
        ),
    ]
    for token in attempts:
        response = await tx.post(token, subject_token_type=TOKEN_TYPE_TXN_TOKEN)
        assert error_of(response) == (400, "invalid_request")
        assert "not a valid, unexpired Txn-Token" in response.json()["error_description"]


async def test_replacement_keeps_rctx_and_aud(tx: Txn) -> None:
    first = await tx.first()
    response = await tx.post(
        first, subject_token_type=TOKEN_TYPE_TXN_TOKEN, request_context=b64({"req_ip": "192.0.2.9"})
    )
    assert error_of(response) == (400, "invalid_request")
    assert "keeps the original rctx" in response.json()["error_description"]
    response = await tx.post(
        first, subject_token_type=TOKEN_TYPE_TXN_TOKEN, audience="https://other.example"
    )
    assert error_of(response) == (400, "invalid_target")


async def test_replacement_cannot_widen_scope(tx: Txn) -> None:
    first = (await tx.post(tx.access(), scope="order:create")).json()["access_token"]
    response = await tx.post(
        first, subject_token_type=TOKEN_TYPE_TXN_TOKEN, scope="order:create order:cancel"
    )
    assert error_of(response) == (400, "invalid_scope")


@pytest.mark.parametrize(
    "change",
    [
        {"amount": {"amount": 500_000_001, "currency": "EUR", "minor_units": 2}},
        {"amount": {"amount": 100, "currency": "USD", "minor_units": 2}},
        {"account": "ACC-2"},
        {"instrument": "FR0000120271"},
        {"venue": "XPAR"},
        {"action": "amend_order"},
        {"type": "settlement_instruction"},
    ],
)
async def test_tctx_beyond_authorization_details(tx: Txn, change: dict[str, Any]) -> None:
    response = await tx.post(tx.access(), request_details=b64({**ORDER, **change}))
    assert error_of(response) == (400, "invalid_request")
    assert (
        "exceed the subject_token's authorization_details" in (response.json()["error_description"])
    )


async def test_tctx_without_authorization_details(tx: Txn) -> None:
    response = await tx.post(tx.access(authorization_details=[]), request_details=b64(ORDER))
    assert error_of(response) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("request_details", "not json"),
        ("request_details", b64({"unknown": 1})),
        ("request_details", b64({**ORDER, "quantity": -1})),
        ("request_details", b64({**ORDER, "origin": "robot"})),
        ("request_context", b64({"req_ip": 7})),
        ("request_context", b64({"client_id": "spoofed"})),
        # no 500 for any shape: wrong JSON types, huge or deeply nested values
        ("request_details", "[1, 2]"),
        ("request_details", b64([ORDER])),
        ("request_details", "null"),
        ("request_details", '"text"'),
        ("request_details", "{" + '"a":' * 5),
        ("request_details", '{"a":' + "[" * 2000 + "]" * 2000 + "}"),
        ("request_details", '{"type":"trade_instruction","order_id":' + nested_json(600) + "}"),
        (
            "request_details",
            '{"action":"create_order","account":"A","type":' + nested_json(600) + "}",
        ),
        ("request_details", orjson.dumps({**ORDER, "quantity": True}).decode()),
        ("request_details", orjson.dumps({**ORDER, "quantity": 1.5}).decode()),
        ("request_details", orjson.dumps({**ORDER, "amount": [1, "EUR", 2]}).decode()),
        ("request_details", orjson.dumps({**ORDER, "amount": {"amount": 1}}).decode()),
        ("request_details", orjson.dumps({**ORDER, "type": {"a": 1}}).decode()),
        ("request_details", orjson.dumps({**ORDER, "side": ["buy"]}).decode()),
        ("request_details", orjson.dumps({**ORDER, "account": "A" * 129}).decode()),
        ("request_details", "{" + " " * 5000 + "}"),
        ("request_details", "é" * 10),
        ("request_details", base64.urlsafe_b64encode(b"\xff\xfe{").decode()),
        ("request_context", "[]"),
        ("request_context", orjson.dumps({"req_ip": {"v4": "192.0.2.1"}}).decode()),
        ("request_context", '{"authn":' + nested_json(600) + "}"),
        ("request_context", orjson.dumps({"authn": "a" * 257}).decode()),
    ],
)
async def test_malformed_parameters(tx: Txn, name: str, value: str) -> None:
    response = await tx.post(tx.access(), **{name: value})
    assert error_of(response) == (400, "invalid_request")


async def test_access_token_cannot_ride_in_rctx(tx: Txn) -> None:
    """§13.4: the access token cannot be smuggled into the Txn-Token through request_context."""
    response = await tx.post(tx.access(), request_context=b64({"authn": tx.access()}))
    assert error_of(response) == (400, "invalid_request")


async def test_parameters_are_not_repeated(tx: Txn) -> None:
    """RFC 6749 §3.2: a parameter sent twice is invalid_request."""
    data = [
        ("grant_type", TOKEN_EXCHANGE),
        ("requested_token_type", TOKEN_TYPE_TXN_TOKEN),
        ("subject_token", tx.access()),
        ("subject_token_type", ACCESS),
        ("audience", tx.server.issuer),
        ("scope", "order:create"),
        ("request_details", b64(ORDER)),
        ("request_details", b64({**ORDER, "quantity": 1})),
        *tx.gateway.auth().items(),
    ]
    response = await tx.server.http.post(
        "/token",
        content=urlencode(data),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert error_of(response) == (400, "invalid_request")


async def test_scope_never_widened(tx: Txn) -> None:
    response = await tx.post(tx.access(), scope="order:create settlement:submit")
    assert error_of(response) == (400, "invalid_scope")


@pytest.mark.parametrize("scope", [None, " "])
async def test_scope_is_required(tx: Txn, scope: str | None) -> None:
    """§11.1: ``scope`` is REQUIRED (RFC 6749 §3.3: a missing scope fails as invalid_scope)."""
    response = await tx.post(tx.access(), scope=scope)
    assert error_of(response) == (400, "invalid_scope")
    assert "scope is required" in response.json()["error_description"]


async def test_unknown_subject_scope_is_refused(tx: Txn) -> None:
    """§13.14: a subject token without scopes bounds nothing: refused, never unconstrained."""
    token = issue_access_token(
        tx.server.services.keys.ring,
        issuer=tx.server.issuer,
        subject="alice",
        client_id=tx.app.client_id,
        audience=EXECUTION,
        scopes=(),
        lifetime=300,
    ).token
    for scope in ("order:create", None):
        response = await tx.post(token, scope=scope)
        assert error_of(response) == (400, "invalid_scope")


async def test_audience_is_required(tx: Txn) -> None:
    """§11.1: ``audience`` is REQUIRED and names the trust domain."""
    response = await tx.post(tx.access(), audience=None)
    assert error_of(response) == (400, "invalid_request")
    assert "audience is required" in response.json()["error_description"]
    response = await tx.post(tx.access(), audience=None, resource=tx.server.issuer)
    assert error_of(response) == (400, "invalid_request")


@pytest.mark.parametrize(
    "extra", [{"actor_token": "x", "actor_token_type": ACCESS}, {"exchange_mode": "impersonation"}]
)
async def test_no_actor_or_impersonation(tx: Txn, extra: dict[str, str]) -> None:
    """A Txn-Token names its requester in req_wl: an actor token or impersonation has no place."""
    response = await tx.post(tx.access(), **extra)
    assert error_of(response) == (400, "invalid_request")


@pytest.mark.parametrize("missing", ["subject_token", "subject_token_type"])
async def test_subject_token_is_required(tx: Txn, missing: str) -> None:
    form: dict[str, Any] = {"subject_token": tx.access(), "subject_token_type": ACCESS}
    form[missing] = None
    response = await tx.post(**form)
    assert error_of(response) == (400, "invalid_request")


@pytest.mark.parametrize(
    "token_type",
    [
        "urn:ietf:params:oauth:token-type:refresh_token",  # §11.2 and §13.3: never
        "urn:ietf:params:oauth:token-type:self_signed",  # §11.2.1: not supported here
        "urn:ietf:params:oauth:token-type:unsigned_json",  # §11.2.2: not supported here
        "urn:ietf:params:oauth:token-type:jwt",
        "not a uri",
    ],
)
async def test_subject_token_types_refused(tx: Txn, token_type: str) -> None:
    response = await tx.post(tx.access(), subject_token_type=token_type)
    assert error_of(response) == (400, "invalid_request")


@pytest.mark.parametrize("lifetime", [-120, -1, 0])
async def test_expired_subject_token(tx: Txn, lifetime: int) -> None:
    """§6: no Txn-Token for a subject token whose expiration time has passed."""
    token = issue_access_token(
        tx.server.services.keys.ring,
        issuer=tx.server.issuer,
        subject="alice",
        client_id=tx.app.client_id,
        audience=EXECUTION,
        scopes=("order:create",),
        lifetime=lifetime,
        extra={"authorization_details": [TRADE]},
    ).token
    response = await tx.post(token)
    assert error_of(response) == (400, "invalid_request")
    assert "expired" in response.json()["error_description"]


async def test_subject_token_signature_is_verified(tx: Txn) -> None:
    """§11.3: the subject_token's signature is verified; a token of another issuer (so another
    ``sub`` namespace, §9.2) is no subject here."""
    response = await tx.post(forged(tx.access(), sub="mallory"))
    assert error_of(response) == (400, "invalid_request")
    claims = jwt.decode(tx.access(), options={"verify_signature": False})
    foreign = jwt.encode(
        {**claims, "iss": "https://other-as.example"},
        new_ec_key(),
        algorithm="ES256",
        headers={"typ": "at+jwt", "kid": "k1"},
    )
    response = await tx.post(foreign)
    assert error_of(response) == (400, "invalid_request")


async def test_requester_is_authenticated(tx: Txn) -> None:
    """§11.3 and §11.5: the requesting workload authenticates; §13.12: never with a Txn-Token."""
    response = await tx.post(
        tx.access(), client_assertion=None, client_assertion_type=None, client_id=None
    )
    assert error_of(response) == (401, "invalid_client")
    txn_token = await tx.first()
    response = await tx.post(tx.access(), client_assertion=txn_token)
    assert error_of(response) == (401, "invalid_client")


async def test_requester_needs_a_right_over_the_subject_token(tx: Txn) -> None:
    """Trust boundary: the requester right alone does not reach another client's token; the
    requester must also be entitled to exchange it (here: not its resource server)."""
    outsider = await register_kit(
        tx.server.services,
        grant_types=["client_credentials", TOKEN_EXCHANGE],
        introspection_resources=[],
        txn_token_requester=True,
    )
    response = await tx.post(tx.access(), kit=outsider, request_details=b64(ORDER))
    assert error_of(response) == (400, "invalid_request")
    assert "may not exchange the subject_token" in response.json()["error_description"]


async def test_txn_token_cannot_become_an_access_token(tx: Txn) -> None:
    """§13.13: a Txn-Token is not an access token: no exchange turns it into one."""
    txn_token = await tx.first()
    for token_type in (TOKEN_TYPE_TXN_TOKEN, ACCESS):
        response = await tx.server.http.post(
            "/token",
            data={
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": txn_token,
                "subject_token_type": token_type,
                "resource": EXECUTION,
                **tx.gateway.auth(),
            },
        )
        assert error_of(response) == (400, "invalid_request")


@pytest.mark.parametrize("lifetime", [4, 301, 3600])
async def test_lifetime_is_kept_short(tmp_path: Path, lifetime: int) -> None:
    """§13.1: a Txn-Token's lifetime MUST be kept short: the setting is bounded to 5..300 s."""
    with pytest.raises(ValidationError, match="txn_token_lifetime"):
        make_settings("sqlite+aiosqlite:///:memory:", tmp_path, txn_token_lifetime=lifetime)


async def test_txn_tokens_are_not_logged_verbatim(tx: Txn) -> None:
    """§15.2: the audit trail records a Txn-Token by its jti and tctx, never the token itself."""
    first = await tx.first()
    second = (await tx.post(first, subject_token_type=TOKEN_TYPE_TXN_TOKEN)).json()["access_token"]
    await tx.post(first, subject_token_type=TOKEN_TYPE_TXN_TOKEN, scope="admin")  # a refusal
    trail = orjson.dumps(await recent_events(tx.server.services.db, 50))
    for token in (first, second):
        assert token.split(".")[2].encode() not in trail
        assert tx.verify(token)["jti"].encode() in trail


async def test_unauthorized_client(tx: Txn) -> None:
    response = await tx.post(tx.access(), kit=tx.plain, request_details=b64(ORDER))
    assert error_of(response) == (400, "unauthorized_client")
    assert "txn-token-requester" in response.json()["error_description"]


async def test_requester_right_is_operator_only(tx: Txn) -> None:
    settings, vocabulary = tx.server.services.settings, tx.server.services.vocabulary
    raw = {
        "lei": LEI,
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
        "jwks": jwks_for(new_ec_key()),
        "txn_token_requester": True,
    }
    with pytest.raises(InvalidClientMetadataError, match="txn_token_requester"):
        validate_metadata(raw, settings, vocabulary)


async def test_expired_or_foreign_txn_token_cannot_be_replaced(tx: Txn) -> None:
    ring = tx.server.services.keys.ring
    now = int(time.time())
    base = {"iss": tx.server.issuer, "aud": tx.server.issuer, "iat": now, "sub": "alice",
            "txn": "t", "scope": "order:create", "req_wl": "x", "tctx": {}, "rctx": {}}  # fmt: skip
    expired = ring.require_signer().with_typ(TXN_TOKEN_TYP).sign({**base, "exp": now - 1})
    wrong_aud = (
        ring.require_signer()
        .with_typ(TXN_TOKEN_TYP)
        .sign({**base, "exp": now + 60, "aud": "https://other.example"})
    )
    wrong_typ = ring.require_signer().sign({**base, "exp": now + 60})  # at+jwt
    no_sub = (
        ring.require_signer().with_typ(TXN_TOKEN_TYP).sign({**base, "exp": now + 60, "sub": None})
    )
    for token in (expired, wrong_aud, wrong_typ, no_sub):
        response = await tx.post(token, subject_token_type=TOKEN_TYPE_TXN_TOKEN)
        assert error_of(response) == (400, "invalid_request")


async def test_txn_token_is_not_an_access_token(tx: Txn) -> None:
    txn_token = (await tx.post(tx.access())).json()["access_token"]
    response = await tx.post(txn_token)  # presented as an access_token
    assert error_of(response) == (400, "invalid_request")


async def test_audience_must_be_the_trust_domain(tx: Txn) -> None:
    response = await tx.post(tx.access(), audience="https://other.example")
    assert error_of(response) == (400, "invalid_target")
    response = await tx.post(tx.access(), audience=tx.server.issuer)
    assert response.status_code == 200, response.text
