"""Transaction Tokens end to end (draft-ietf-oauth-transaction-tokens-10): a live ``trustplane
serve``; a gateway client made a Txn-Token requester with ``trustplane clients add
--txn-token-requester`` exchanges the caller's access token for a Txn-Token over HTTP; a resource
server built on the PEP SDK validates both tokens against the server's JWKS (real HTTP) and its PDP
sees the ``tctx``. A client without the right is refused ``unauthorized_client``."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import Depends, FastAPI, Request

from tests.conftest import (
    EXECUTION,
    LEI,
    ClientKit,
    jwks_for,
    new_ec_key,
    run_sync,
    wait_until,
)
from tests.e2e.conftest import PROPAGATION_TIMEOUT, LiveServer, LiveServers, knows_client
from tests.rar.test_registry import TRADE
from trustplane.authzen.model import Decision, DecisionRequest, Entity
from trustplane.oauth.exchange import TOKEN_EXCHANGE
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import PolicyEnforcer, TokenValidator, TrustedIssuer, TxnTokenValidator
from trustplane.pep.http import Grant, Pep

pytestmark = pytest.mark.e2e
TXN_TOKEN = "urn:ietf:params:oauth:token-type:txn_token"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
ORDER = {"type": "trade_instruction", "action": "create_order", "account": "ACC-1",
         "order_id": "ORD-9", "side": "buy", "quantity": 5, "instrument": "US0378331005",
         "venue": "XLON", "approval": "not_required", "origin": "auto",
         "amount": {"amount": 250_000, "currency": "EUR", "minor_units": 2}}  # fmt: skip


@dataclass
class RecordingPdp:
    contexts: list[Mapping[str, Any]] = field(default_factory=list)

    async def decide(
        self, subject: Entity, action: str, resource: Entity, context: Mapping[str, Any],
        *, correlation_id: str | None = None, transaction_id: str | None = None,
    ) -> Decision:  # fmt: skip
        self.contexts.append(context)
        return Decision(True, ("test_allow",), "test", uuid.uuid4().hex)

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        raise NotImplementedError


def add_client(server: LiveServer, *extra: str) -> ClientKit:
    key = new_ec_key()
    jwks_file = Path(server.env["TRUSTPLANE_DATA_DIR"]) / f"txn-{uuid.uuid4().hex[:6]}.json"
    jwks_file.write_text(json.dumps(jwks_for(key)))
    body = server.cli_json(
        "clients", "add", "--lei", LEI, "--jwks-file", str(jwks_file), "--scope", "order:create",
        "--resource", EXECUTION, "--grant-type", "client_credentials", "--grant-type",
        TOKEN_EXCHANGE, *extra,
    )  # fmt: skip
    kit = ClientKit(body["client_id"], key, server.issuer)
    wait_until(lambda: knows_client(server, kit), PROPAGATION_TIMEOUT, "the client")
    return kit


def b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def test_txn_token_from_issue_to_pep(live_server: LiveServers) -> None:
    a = live_server.start()
    app = add_client(a, "--authorization-details-type", "trade_instruction")
    gateway = add_client(a, "--introspection-resource", EXECUTION, "--txn-token-requester")
    plain = add_client(a, "--introspection-resource", EXECUTION)
    issued = httpx.post(
        f"{a.base_url}/token",
        data={"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION,
              "authorization_details": json.dumps([TRADE]), **app.auth()},
        timeout=10,
    )  # fmt: skip
    assert issued.status_code == 200, issued.text
    access = issued.json()["access_token"]

    def exchange(kit: ClientKit) -> httpx.Response:
        return httpx.post(
            f"{a.base_url}/token",
            data={"grant_type": TOKEN_EXCHANGE, "requested_token_type": TXN_TOKEN,
                  "subject_token": access, "subject_token_type": ACCESS,
                  "audience": a.issuer, "scope": "order:create",
                  "request_details": b64(ORDER), "request_context": b64({"req_ip": "192.0.2.9"}),
                  **kit.auth()},
            timeout=10,
        )  # fmt: skip

    refused = exchange(plain)
    assert refused.status_code == 400
    assert refused.json()["error"] == "unauthorized_client"
    response = exchange(gateway)
    assert response.status_code == 200, response.text
    assert response.json()["issued_token_type"] == TXN_TOKEN
    assert response.json()["token_type"] == "N_A"
    assert "refresh_token" not in response.json()
    txn_token = response.json()["access_token"]

    async def call_resource_server() -> tuple[list[httpx.Response], RecordingPdp]:
        fetcher = OutboundFetcher(OutboundPolicy.development())
        validator = TokenValidator(
            audience=EXECUTION, issuers=[TrustedIssuer(a.issuer)], fetcher=fetcher
        )
        pdp = RecordingPdp()
        pep = Pep(
            PolicyEnforcer(validator, pdp, realm="execution"),
            txn_tokens=TxnTokenValidator(validator, trust_domain=a.issuer),
        )
        rs = FastAPI()
        pep.install(rs)

        async def order(_request: Request) -> Entity:
            return Entity("Order", "ORD-9")

        @rs.post("/orders")
        async def create(
            grant: Grant = Depends(pep.require("order:create", resource=order, txn_token=True)),
        ) -> dict[str, Any]:
            assert grant.txn_token is not None
            txn = grant.txn_token
            return {"txn": txn.txn, "tctx": txn.tctx, "req_wl": list(txn.req_wl)}

        transport = httpx.ASGITransport(app=rs)
        async with httpx.AsyncClient(transport=transport, base_url="http://rs.test") as client:
            bearer = {"Authorization": f"Bearer {access}"}
            answers = [
                await client.post("/orders", headers={**bearer, "Txn-Token": txn_token}),
                await client.post("/orders", headers=bearer),
                await client.post("/orders", headers={**bearer, "Txn-Token": access}),
            ]
        await validator.aclose()
        return answers, pdp

    (ok, missing, wrong_typ), pdp = run_sync(call_resource_server())
    assert ok.status_code == 200, ok.text
    assert ok.json()["tctx"]["order_id"] == "ORD-9"
    assert ok.json()["tctx"]["authorization_details_digest"]
    assert ok.json()["req_wl"] == [gateway.client_id]
    assert pdp.contexts == [{"tctx": ok.json()["tctx"]}]
    for refused_call in (missing, wrong_typ):
        assert refused_call.status_code == 401
        assert refused_call.json()["error"] == "invalid_token"
        assert refused_call.json()["error_description"].startswith("Txn-Token: ")
