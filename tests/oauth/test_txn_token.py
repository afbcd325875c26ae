"""Transaction Tokens (draft-ietf-oauth-transaction-tokens-10) at the token endpoint: the issued
Txn-Token verified by PyJWT with the server's JWKS, the replacement rules, and every refusal with
its exact status and error code."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
import pytest
import pytest_asyncio

from tests.conftest import (
    EXECUTION,
    LEI,
    PROTOCOL_DATABASES,
    ClientKit,
    jwks_for,
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


def b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


@dataclass
class Txn:
    server: Server
    app: ClientKit  # the external client the access token was issued to
    gateway: ClientKit  # the workload allowed to request Txn-Tokens
    plain: ClientKit  # token exchange allowed, Txn-Tokens not
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
        subject_token: str,
        kit: ClientKit | None = None,
        subject_token_type: str = ACCESS,
        **form: Any,
    ) -> httpx.Response:
        data = {
            "grant_type": TOKEN_EXCHANGE,
            "requested_token_type": TOKEN_TYPE_TXN_TOKEN,
            "subject_token": subject_token,
            "subject_token_type": subject_token_type,
            **(kit or self.gateway).auth(),
            **form,
        }
        return await self.server.http.post("/token", data=data)

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
                options={"require": ["exp", "iat", "aud", "txn", "sub"]},
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
        jwks = jwt.PyJWKSet.from_dict((await server.http.get("/jwks")).json())
        yield Txn(server, app, gateway, plain, jwks)


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
    assert claims["exp"] - claims["iat"] == 60
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
    first = (await tx.post(tx.access(), request_details=b64(ORDER))).json()["access_token"]
    narrower = {"quantity": 400, "amount": {**ORDER["amount"], "amount": 40_000_00}}
    response = await tx.post(
        first,
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
    assert after["req_wl"] == [tx.gateway.client_id, tx.gateway.client_id]
    assert after["exp"] <= before["exp"]


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
    ],
)
async def test_replacement_cannot_widen_tctx(tx: Txn, widening: dict[str, Any]) -> None:
    first = (await tx.post(tx.access(), request_details=b64(ORDER))).json()["access_token"]
    response = await tx.post(
        first, subject_token_type=TOKEN_TYPE_TXN_TOKEN, request_details=b64(widening)
    )
    assert error_of(response) == (400, "invalid_request")
    assert "only narrow tctx" in response.json()["error_description"]


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
    ],
)
async def test_malformed_parameters(tx: Txn, name: str, value: str) -> None:
    response = await tx.post(tx.access(), **{name: value})
    assert error_of(response) == (400, "invalid_request")


async def test_scope_never_widened(tx: Txn) -> None:
    response = await tx.post(tx.access(), scope="order:create settlement:submit")
    assert error_of(response) == (400, "invalid_scope")


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
    for token in (expired, wrong_aud, wrong_typ):
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
