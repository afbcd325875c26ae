"""AuthzenClient (the remote DecisionPoint) against a scripted PDP: token reuse and renewal, and every
way a PDP can fail turning into a ``pdp_unreachable`` deny; the wire codec round-trips entities."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from trustplane.authzen.model import DecisionRequest, Entity
from trustplane.authzen.wire import (
    entity_from_json,
    entity_to_json,
    request_from_json,
    request_to_json,
)
from trustplane.pep import AuthzenClient, ClientSecretBasic, OutboundFetcher

PDP = "https://pdp.example"


@dataclass
class ScriptedPdp:
    answers: list[httpx.Response] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    evaluations: list[httpx.Request] = field(default_factory=list)
    lifetime: int = 300

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            form = dict(httpx.QueryParams(request.content.decode()))
            self.token_requests.append(form)
            token = f"tok-{len(self.token_requests)}"
            return httpx.Response(200, json={"access_token": token, "expires_in": self.lifetime})
        self.evaluations.append(request)
        return self.answers.pop(0)

    def client(self) -> AuthzenClient:
        return AuthzenClient(
            PDP,
            token_endpoint=f"{PDP}/token",
            auth=ClientSecretBasic("rs", "secret"),
            fetcher=OutboundFetcher(transport=httpx.MockTransport(self.handler)),
        )


def allow(reason: str = "entity.own") -> httpx.Response:
    context = {"decision_id": "d1", "reason_ids": [reason], "bundle_version": "v1"}
    return httpx.Response(200, json={"decision": True, "context": context})


SUBJECT = Entity("Client", "c-1", {"legal_entity": Entity("LegalEntity", "L")})
RESOURCE = Entity("Order", "O-1")


async def ask(client: AuthzenClient) -> Any:
    return await client.decide(SUBJECT, "order:create", RESOURCE, {"a": 1}, correlation_id="r-1")


async def test_decision_token_and_wire_format() -> None:
    pdp = ScriptedPdp([allow()])

    decision = await ask(pdp.client())

    assert decision.allowed
    assert decision.reason_ids == ("entity.own",)
    assert pdp.token_requests[0]["scope"] == "decision:evaluate"
    assert pdp.token_requests[0]["resource"] == f"{PDP}/access/v1"
    sent = pdp.evaluations[0]
    assert sent.url == f"{PDP}/access/v1/evaluation"
    assert sent.headers["authorization"] == "Bearer tok-1"
    assert sent.headers["x-request-id"] == "r-1"
    body = json.loads(sent.content)
    assert body["action"] == {"name": "order:create"}
    assert body["subject"]["properties"]["legal_entity"] == {
        "__entity": {"type": "LegalEntity", "id": "L"}
    }


async def test_token_is_reused_then_renewed_once_after_a_401() -> None:
    pdp = ScriptedPdp([allow(), allow(), httpx.Response(401), allow()])
    client = pdp.client()

    assert (await ask(client)).allowed
    assert (await ask(client)).allowed
    assert len(pdp.token_requests) == 1
    assert (await ask(client)).allowed  # 401, then the same question with a fresh token

    assert len(pdp.token_requests) == 2
    assert [r.headers["authorization"] for r in pdp.evaluations[-2:]] == [
        "Bearer tok-1",
        "Bearer tok-2",
    ]


async def test_a_second_401_is_a_fail_closed_deny() -> None:
    pdp = ScriptedPdp([httpx.Response(401), httpx.Response(401)])

    decision = await ask(pdp.client())

    assert decision.reason_ids == ("pdp_unreachable",)
    assert len(pdp.evaluations) == 2


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500, json={"error": "x"}),
        httpx.Response(200, content=b"not json"),
        httpx.Response(200, json={"decision": "yes"}),
        httpx.Response(200, json=[True]),
    ],
    ids=["500", "not JSON", "decision not a boolean", "not an object"],
)
async def test_any_failure_is_a_fail_closed_deny(answer: httpx.Response) -> None:
    decision = await ask(ScriptedPdp([answer]).client())

    assert not decision.allowed
    assert decision.reason_ids == ("pdp_unreachable",)
    assert decision.decision_id


async def test_batch_with_a_wrong_number_of_answers_denies_all() -> None:
    body = {"evaluations": [{"decision": True}]}
    pdp = ScriptedPdp([httpx.Response(200, json=body)])
    requests = [DecisionRequest(SUBJECT, "order:create", RESOURCE)] * 2

    decisions = await pdp.client().decide_many(requests)

    assert [d.allowed for d in decisions] == [False, False]
    assert all(d.reason_ids == ("pdp_unreachable",) for d in decisions)


async def test_batch_keeps_order() -> None:
    answers = {"evaluations": [{"decision": True}, {"decision": False, "context": {}}]}
    pdp = ScriptedPdp([httpx.Response(200, json=answers)])
    requests = [DecisionRequest(SUBJECT, "order:create", RESOURCE)] * 2

    decisions = await pdp.client().decide_many(requests)

    assert [d.allowed for d in decisions] == [True, False]
    assert len(json.loads(pdp.evaluations[0].content)["evaluations"]) == 2


def test_entities_round_trip_through_the_wire_format() -> None:
    owner = Entity("LegalEntity", "L")
    instrument = Entity("Instrument", "XS1", {"instrument_class": "bond", "restricted": True})
    order = Entity(
        "Order",
        "O-1",
        {"owner": owner, "instrument": instrument, "tags": ["a", "b"], "limits": {"max": 5}},
        (Entity("Desk", "D", {}, (owner,)),),
    )

    assert entity_from_json(json.loads(json.dumps(entity_to_json(order))), "x") == order


def test_the_transaction_id_round_trips_and_is_omitted_when_absent() -> None:
    subject = Entity("Client", "c-1")
    resource = Entity("Order", "O-1")
    with_txn = DecisionRequest(subject, "order:create", resource, {}, None, "txn-7")
    without = DecisionRequest(subject, "order:create", resource, {})

    assert request_to_json(with_txn)["transaction_id"] == "txn-7"
    assert "transaction_id" not in request_to_json(without)
    parsed = request_from_json(request_to_json(with_txn), "", "req-1")
    assert (parsed.transaction_id, parsed.correlation_id) == ("txn-7", "req-1")
