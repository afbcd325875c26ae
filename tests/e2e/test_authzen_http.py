"""AuthZEN over real HTTP: a live ``trustplane serve``, a PEP-side client that gets its token by
client credentials like any caller, single and batch evaluations, and the caller refusals."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import LEI, ClientKit
from tests.e2e.conftest import (
    DATABASES,
    LiveServer,
    client_credentials_token,
    module_server,
    register_client,
)
from trustplane.authzen.model import DecisionRequest, Entity
from trustplane.authzen.wire import request_to_json
from trustplane.pep import AuthzenClient, OutboundFetcher, OutboundPolicy, PrivateKeyJwt

pytestmark = pytest.mark.e2e
OTHER_LEI = "529900T8BM49AURSDO55"


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    yield from module_server(request, tmp_path_factory, "authzen")


@pytest.fixture(scope="module")
def pep_kit(server: LiveServer) -> ClientKit:
    return register_client(
        server,
        scopes=("decision:evaluate",),
        resources=(f"{server.issuer}/access/v1",),
        introspection_resources=(),
    )


@pytest.fixture(scope="module")
def token(server: LiveServer, pep_kit: ClientKit) -> str:
    return client_credentials_token(
        server, pep_kit, "decision:evaluate", f"{server.issuer}/access/v1"
    )


def order_request(owner: str = LEI) -> DecisionRequest:
    principal_le = Entity("LegalEntity", LEI)
    owner_le = Entity("LegalEntity", owner)
    subject = Entity(
        "Client", "c-1", {"legal_entity": principal_le, "scopes": ["order:create"]}, (principal_le,)
    )
    account = Entity("Account", "ACC-1", {"owner": owner_le}, (owner_le,))
    instrument = Entity("Instrument", "XS1", {"instrument_class": "bond", "restricted": False})
    resource = Entity(
        "Order", "O-1", {"owner": owner_le, "account": account, "instrument": instrument}
    )
    context = {
        "data_region": "eu",
        "delegation_depth": 0,
        "amount_minor": 100,
        "currency": "EUR",
        "instrument_class": "bond",
    }
    return DecisionRequest(subject, "order:create", resource, context)


def post(server: LiveServer, path: str, body: Any, token: str | None) -> httpx.Response:
    headers = {"X-Request-ID": "e2e-req-1"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{server.base_url}/access/v1/{path}", json=body, headers=headers, timeout=10)


def test_metadata(server: LiveServer) -> None:
    response = httpx.get(f"{server.base_url}/.well-known/authzen-configuration", timeout=10)

    assert response.status_code == 200
    assert response.json()["policy_decision_point"] == server.issuer
    assert response.json()["access_evaluation_endpoint"] == f"{server.issuer}/access/v1/evaluation"


def test_single_evaluation(server: LiveServer, token: str) -> None:
    allow = post(server, "evaluation", request_to_json(order_request()), token)
    deny = post(server, "evaluation", request_to_json(order_request(OTHER_LEI)), token)

    assert allow.status_code == deny.status_code == 200
    assert allow.json()["decision"] is True
    assert allow.json()["context"]["reason_ids"] == ["entity.own"]
    assert deny.json()["decision"] is False
    assert deny.json()["context"]["reason_ids"] == ["default_deny"]
    assert allow.headers["x-request-id"] == "e2e-req-1"


def test_batch_evaluation(server: LiveServer, token: str) -> None:
    first = request_to_json(order_request())
    body = {
        "subject": first["subject"],
        "action": first["action"],
        "context": first["context"],
        "evaluations": [
            {"resource": first["resource"]},
            {"resource": request_to_json(order_request(OTHER_LEI))["resource"]},
            {"resource": first["resource"]},
        ],
        "options": {"evaluations_semantic": "deny_on_first_deny"},
    }

    response = post(server, "evaluations", body, token)

    assert response.status_code == 200, response.text
    assert [e["decision"] for e in response.json()["evaluations"]] == [True, False]


async def test_the_sdk_client_against_the_live_pdp(server: LiveServer, pep_kit: ClientKit) -> None:
    """``AuthzenClient`` gets its own token by private_key_jwt and asks single and batch."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(pep_kit.pem, None)
    auth = PrivateKeyJwt(pep_kit.client_id, key, pep_kit.kid, server.issuer)  # type: ignore[arg-type]
    fetcher = OutboundFetcher(OutboundPolicy.development())  # the live server is on loopback
    client = AuthzenClient(
        server.issuer, token_endpoint=f"{server.issuer}/token", auth=auth, fetcher=fetcher
    )
    try:
        one = order_request()
        single = await client.decide(one.subject, one.action, one.resource, one.context)
        batch = await client.decide_many([order_request(), order_request(OTHER_LEI)])
    finally:
        await fetcher.aclose()

    assert single.allowed
    assert single.reason_ids == ("entity.own",)
    assert len(single.bundle_version) == 64
    assert [d.allowed for d in batch] == [True, False]


def challenge(response: httpx.Response) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', response.headers["www-authenticate"]))


def test_no_token(server: LiveServer) -> None:
    response = post(server, "evaluation", request_to_json(order_request()), None)

    assert response.status_code == 401
    assert "error" not in challenge(response)


def test_token_for_a_business_api_is_invalid_token(server: LiveServer) -> None:
    trader = register_client(server)
    business = client_credentials_token(
        server, trader, "order:create", "https://execution.example/api"
    )

    response = post(server, "evaluations", request_to_json(order_request()), business)

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert challenge(response)["error"] == "invalid_token"


def test_bad_body_is_400(server: LiveServer, token: str) -> None:
    body = {**request_to_json(order_request()), "subject": {"type": "Client"}}
    response = post(server, "evaluation", body, token)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "subject.id" in response.json()["error_description"]
