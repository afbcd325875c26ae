"""The AuthZEN HTTP PDP in process, on SQLite and PostgreSQL, against the default bundle: the spec's
request shapes, default values and evaluation semantics, its 400s, and RFC 6750 caller authentication."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from sqlalchemy import text

from tests.conftest import LEI, ClientKit, register_kit
from tests.protocol_server import Server
from trustplane.audit.sink import recent_events
from trustplane.clients.model import ClientStatus
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")
OTHER_LEI = "529900T8BM49AURSDO55"
JSON = {"Content-Type": "application/json"}


def pdp_audience(server: Server) -> str:
    return f"{server.issuer}/access/v1"


async def caller(server: Server, scope: str = "decision:evaluate") -> tuple[ClientKit, str]:
    kit = await register_kit(server.services, scope=scope, allowed_resources=[pdp_audience(server)])
    token = await server.access_token(kit, scope=scope, resource=pdp_audience(server))
    return kit, token


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def token(server: Server) -> str:
    return (await caller(server))[1]


def client(lei: str = LEI) -> dict[str, Any]:
    le = {"type": "LegalEntity", "id": lei}
    return {
        "type": "Client",
        "id": "c-1",
        "properties": {"legal_entity": {"__entity": le}, "scopes": ["order:create"]},
        "parents": [le],
    }


def order(owner: str = LEI, restricted: bool = False, oid: str = "O-1") -> dict[str, Any]:
    le = {"__entity": {"type": "LegalEntity", "id": owner}}
    account = {"type": "Account", "id": "ACC-1", "properties": {"owner": le}}
    instrument = {
        "type": "Instrument",
        "id": "XS1",
        "properties": {"instrument_class": "bond", "restricted": restricted},
    }
    return {
        "type": "Order",
        "id": oid,
        "properties": {
            "owner": le,
            "account": {"__entity": account},
            "instrument": {"__entity": instrument},
        },
    }


CONTEXT = {
    "data_region": "eu",
    "delegation_depth": 0,
    "amount_minor": 1000,
    "currency": "EUR",
    "instrument_class": "bond",
}


def evaluation(**overrides: Any) -> dict[str, Any]:
    body = {
        "subject": client(),
        "action": {"name": "order:create"},
        "resource": order(),
        "context": CONTEXT,
    }
    body.update(overrides)
    return body


async def post(
    server: Server, path: str, body: Any, token: str | None, **headers: str
) -> httpx.Response:
    sent = dict(JSON)
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers)
    content = body if isinstance(body, bytes) else None
    return await server.http.post(
        f"/access/v1/{path}", content=content, json=None if content else body, headers=sent
    )


async def test_metadata_document(server: Server) -> None:
    response = await server.http.get("/.well-known/authzen-configuration")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "policy_decision_point": server.issuer,
        "access_evaluation_endpoint": f"{server.issuer}/access/v1/evaluation",
        "access_evaluations_endpoint": f"{server.issuer}/access/v1/evaluations",
    }


async def test_single_evaluation_allow(server: Server, token: str) -> None:
    labels = {"endpoint": "evaluation", "decision": "allow"}
    before = REGISTRY.get_sample_value("trustplane_authzen_decisions_total", labels) or 0.0

    response = await post(server, "evaluation", evaluation(), token, **{"X-Request-ID": "req-1"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["decision"] is True
    assert body["context"]["reason_ids"] == ["entity.own"]
    assert body["context"]["bundle_version"] == server.services.policy.engine.version
    assert len(body["context"]["decision_id"]) == 32
    assert response.headers["x-request-id"] == "req-1"
    assert response.headers["cache-control"] == "no-store"
    assert REGISTRY.get_sample_value("trustplane_authzen_decisions_total", labels) == before + 1


async def test_decisions_are_recorded_with_the_request_id(server: Server, token: str) -> None:
    body = {**evaluation(), "evaluations": [{}, {"resource": order(owner=OTHER_LEI)}]}

    response = await post(server, "evaluations", body, token, **{"X-Request-ID": "trace-42"})

    ids = [e["context"]["decision_id"] for e in response.json()["evaluations"]]
    async with server.services.db.read() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT decision_id, allowed, correlation_id FROM policy_decisions "
                    "WHERE correlation_id = 'trace-42' ORDER BY decision_id"
                )
            )
        ).all()
    assert sorted((r[0], bool(r[1]), r[2]) for r in rows) == sorted(
        [(ids[0], True, "trace-42"), (ids[1], False, "trace-42")]
    )


async def test_decisions_are_recorded_in_the_transaction(server: Server, token: str) -> None:
    """trustplane's extension member ``transaction_id`` (a PEP sends its token's ``txn``): the
    decisions' ledger entries carry it, so the transaction's chain of authority lists them; a batch
    takes it as a top-level default like subject and context."""
    single = await post(server, "evaluation", {**evaluation(), "transaction_id": "txn-az-1"}, token)
    body = {**evaluation(), "transaction_id": "txn-az-2", "evaluations": [{}, {}]}
    batch = await post(server, "evaluations", body, token)

    assert single.status_code == batch.status_code == 200, single.text + batch.text
    events = await recent_events(server.services.db, 20, "policy:decision:allowed")
    by_txn = {
        txn: sorted(e["event_id"] for e in events if e["transaction_id"] == txn)
        for txn in ("txn-az-1", "txn-az-2")
    }
    assert by_txn["txn-az-1"] == [single.json()["context"]["decision_id"]]
    assert by_txn["txn-az-2"] == sorted(
        e["context"]["decision_id"] for e in batch.json()["evaluations"]
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"resource": order(owner=OTHER_LEI)}, "default_deny"),
        ({"resource": order(restricted=True)}, "instrument.restricted"),
        ({"context": {**CONTEXT, "data_region": "us"}}, "residency.region_served"),
        ({"context": {k: v for k, v in CONTEXT.items() if k != "currency"}}, "missing_attribute"),
    ],
)
async def test_single_evaluation_deny_is_200_false(
    server: Server, token: str, overrides: dict[str, Any], reason: str
) -> None:
    response = await post(server, "evaluation", evaluation(**overrides), token)

    assert response.status_code == 200
    assert response.json()["decision"] is False
    assert reason in response.json()["context"]["reason_ids"]


async def test_batch_applies_top_level_defaults_and_keeps_order(server: Server, token: str) -> None:
    body = {
        "subject": client(),
        "action": {"name": "order:create"},
        "context": CONTEXT,
        "evaluations": [
            {"resource": order(oid="O-1")},
            {"resource": order(owner=OTHER_LEI, oid="O-2")},
            {"resource": order(oid="O-3"), "context": {**CONTEXT, "data_region": "us"}},
            {
                "resource": order(oid="O-4"),
                "action": {"name": "order:cancel"},
                "context": {"data_region": "eu", "delegation_depth": 0},
            },
        ],
    }

    response = await post(server, "evaluations", body, token, **{"X-Request-ID": "batch-1"})

    assert response.status_code == 200, response.text
    results = response.json()["evaluations"]
    assert [r["decision"] for r in results] == [True, False, False, True]
    assert results[1]["context"]["reason_ids"] == ["default_deny"]
    assert results[2]["context"]["reason_ids"] == ["residency.region_served"]
    assert len({r["context"]["decision_id"] for r in results}) == 4
    assert response.headers["x-request-id"] == "batch-1"


@pytest.mark.parametrize(
    ("semantic", "expected"),
    [
        ("execute_all", [True, False, True, False]),
        ("deny_on_first_deny", [True, False]),
        ("permit_on_first_permit", [True]),
    ],
)
async def test_evaluations_semantics(
    server: Server, token: str, semantic: str, expected: list[bool]
) -> None:
    owners = [LEI, OTHER_LEI, LEI, OTHER_LEI]
    body = {
        **evaluation(),
        "evaluations": [{"resource": order(owner=o, oid=f"O-{i}")} for i, o in enumerate(owners)],
        "options": {"evaluations_semantic": semantic},
    }

    response = await post(server, "evaluations", body, token)

    assert response.status_code == 200, response.text
    assert [r["decision"] for r in response.json()["evaluations"]] == expected


async def test_permit_on_first_permit_runs_until_the_first_permit(
    server: Server, token: str
) -> None:
    body = {
        **evaluation(),
        "evaluations": [{"resource": order(owner=OTHER_LEI)}, {}, {"resource": order()}],
        "options": {"evaluations_semantic": "permit_on_first_permit"},
    }

    response = await post(server, "evaluations", body, token)

    assert [r["decision"] for r in response.json()["evaluations"]] == [False, True]


@pytest.mark.parametrize("evaluations", [None, []], ids=["absent", "empty"])
async def test_evaluations_without_an_array_is_a_single_evaluation(
    server: Server, token: str, evaluations: Any
) -> None:
    body = evaluation() if evaluations is None else {**evaluation(), "evaluations": evaluations}

    response = await post(server, "evaluations", body, token)

    assert response.status_code == 200
    assert response.json()["decision"] is True
    assert "evaluations" not in response.json()


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("not JSON", b"{not json", "not valid JSON"),
    ("an array", [evaluation()], "JSON object"),
    (
        "no subject",
        {k: v for k, v in evaluation().items() if k != "subject"},
        "subject is required",
    ),
    ("no action", {k: v for k, v in evaluation().items() if k != "action"}, "action is required"),
    ("subject a string", evaluation(subject="alice"), "subject must be a JSON object"),
    ("id a number", evaluation(subject={"type": "Client", "id": 7}), "subject.id"),
    ("empty type", evaluation(resource={"type": "", "id": "x"}), "resource.type"),
    ("action without name", evaluation(action={"properties": {}}), "action.name"),
    ("properties an array", evaluation(subject={**client(), "properties": []}), "properties"),
    ("context an array", evaluation(context=[1]), "context must be a JSON object"),
    (
        "context an entity reference",
        evaluation(context={"__entity": {"type": "A", "id": "b"}}),
        "context must be a JSON object of attributes",
    ),
    ("parents not an array", evaluation(subject={**client(), "parents": {}}), "parents"),
    ("bad entity ref", evaluation(context={"x": {"__entity": {"type": "A"}}}), "__entity.id"),
    ("too deep", evaluation(context={"x": nested(40)}), "nest"),
    ("transaction_id a number", evaluation(transaction_id=7), "transaction_id"),
    ("transaction_id empty", evaluation(transaction_id=""), "transaction_id"),
]


@pytest.mark.parametrize(
    ("body", "message"), [(b[1], b[2]) for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
@pytest.mark.parametrize("path", ["evaluation", "evaluations"])
async def test_bad_bodies_are_400_with_a_clear_error(
    server: Server, token: str, path: str, body: Any, message: str
) -> None:
    response = await post(server, path, body, token)

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert message in response.json()["error_description"]


BAD_BATCHES: list[tuple[str, Any, str]] = [
    ("evaluations an object", {"evaluations": {}}, "evaluations must be an array"),
    (
        "an item without subject and no default",
        {"evaluations": [evaluation(), {"action": {"name": "order:create"}, "resource": order()}]},
        "evaluations[1].subject is required",
    ),
    ("an item not an object", {**evaluation(), "evaluations": [1]}, "evaluations[0] must be"),
    (
        "unknown semantic",
        {**evaluation(), "evaluations": [{}], "options": {"evaluations_semantic": "any"}},
        "evaluations_semantic",
    ),
    ("options a string", {**evaluation(), "evaluations": [{}], "options": "x"}, "options"),
    ("too many", {**evaluation(), "evaluations": [{}] * 101}, "at most 100"),
]


@pytest.mark.parametrize(
    ("body", "message"), [(b[1], b[2]) for b in BAD_BATCHES], ids=[b[0] for b in BAD_BATCHES]
)
async def test_bad_batches_are_400(server: Server, token: str, body: Any, message: str) -> None:
    response = await post(server, "evaluations", body, token)

    assert response.status_code == 400, response.text
    assert message in response.json()["error_description"]


async def test_content_type_must_be_json(server: Server, token: str) -> None:
    response = await server.http.post(
        "/access/v1/evaluation",
        content=b"{}",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"},
    )

    assert response.status_code == 400
    assert "Content-Type" in response.json()["error_description"]


# --------------------------------------------------------------------------- caller authentication


def challenge(response: httpx.Response) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', response.headers["www-authenticate"]))


async def test_no_token_is_401_with_a_bare_challenge(server: Server) -> None:
    response = await post(server, "evaluation", evaluation(), None)

    assert response.status_code == 401
    assert challenge(response) == {"realm": "trustplane"}  # the one realm of every API of ours
    assert response.json() == {
        "error": "invalid_token",
        "error_description": "a bearer access token is required",
    }


async def test_token_for_another_audience_is_invalid_token(server: Server) -> None:
    token = await server.access_token()  # the module's client, audience EXECUTION

    response = await post(server, "evaluation", evaluation(), token)

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert challenge(response)["error"] == "invalid_token"


async def test_token_without_decision_evaluate_is_insufficient_scope(server: Server) -> None:
    _, token = await caller(server, scope="policy:simulate")

    response = await post(server, "evaluations", {**evaluation(), "evaluations": [{}]}, token)

    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert challenge(response)["scope"] == "decision:evaluate"


async def test_expired_token_is_invalid_token(server: Server) -> None:
    kit, _ = await caller(server)
    expired = issue_access_token(
        server.services.keys.ring,
        issuer=server.issuer,
        subject=kit.client_id,
        client_id=kit.client_id,
        audience=pdp_audience(server),
        scopes=("decision:evaluate",),
        lifetime=-1,
    ).token

    response = await post(server, "evaluation", evaluation(), expired)

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


async def test_disabling_the_caller_ends_its_token_at_once(server: Server) -> None:
    """The caller's signature is verified once per token, but its client is checked every call."""
    kit, token = await caller(server)
    assert (await post(server, "evaluation", evaluation(), token)).status_code == 200

    await server.services.clients.set_status(kit.client_id, ClientStatus.DISABLED)
    response = await post(server, "evaluation", evaluation(), token)

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert "not active" in response.json()["error_description"]


async def test_foreign_signature_is_invalid_token(server: Server, token: str) -> None:
    head, body, _ = token.split(".")
    response = await post(server, "evaluation", evaluation(), f"{head}.{body}.AAAA")

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


async def test_token_in_query_string_is_refused(server: Server, token: str) -> None:
    response = await server.http.post(
        f"/access/v1/evaluation?access_token={token}", json=evaluation(), headers=JSON
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_request_id_is_echoed_on_errors_too(server: Server) -> None:
    response = await post(server, "evaluation", evaluation(), None, **{"X-Request-ID": "e-1"})

    assert response.status_code == 401
    assert response.headers["x-request-id"] == "e-1"


async def test_wrong_method_is_405(server: Server) -> None:
    assert (await server.http.get("/access/v1/evaluation")).status_code == 405
