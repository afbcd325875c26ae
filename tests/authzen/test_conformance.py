"""OpenID AuthZEN Authorization API 1.0 conformance of the HTTP PDP, one table-driven negative case
per MUST (docs/policy.md, "Conformance (AuthZEN 1.0)"), on SQLite and PostgreSQL: the REQUIRED
members of the information model (§5, §6.1, §10.1.1), the batch's defaults and semantics (§7.1),
what is not served (§8, §10.1), the request identifier (§10.1.3), a failing PDP (§7.2.1: closed), and
the values a decision's ledger entry must hold (its integration failed on PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text

from tests.policy.test_authzen import CONTEXT, OTHER_LEI, caller, client, evaluation, order, post
from tests.protocol_server import Server
from trustplane.authzen import wire

pytestmark = pytest.mark.asyncio(loop_scope="module")
RID = {"X-Request-ID": "conf-1"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def token(server: Server) -> str:
    return (await caller(server))[1]


def without(entity: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in entity.items() if k != key}


# --------------------------------------------------------------------------- REQUIRED members

#: (case, body, exact error_description): §5.1 subject, §5.2 resource (type and id REQUIRED strings),
#: §5.3 action (name REQUIRED string), §6.1 (subject, action, resource REQUIRED), §10.1.1 (an omitted
#: required attribute MUST be a Bad Request).
MISSING: list[tuple[str, Any, str]] = [
    ("no subject", without(evaluation(), "subject"), "subject is required"),
    ("no resource", without(evaluation(), "resource"), "resource is required"),
    ("no action", without(evaluation(), "action"), "action is required"),
    (
        "subject without type",
        evaluation(subject=without(client(), "type")),
        "subject.type must be a non-empty string",
    ),
    (
        "subject without id",
        evaluation(subject=without(client(), "id")),
        "subject.id must be a non-empty string",
    ),
    (
        "resource without type",
        evaluation(resource=without(order(), "type")),
        "resource.type must be a non-empty string",
    ),
    (
        "resource without id",
        evaluation(resource=without(order(), "id")),
        "resource.id must be a non-empty string",
    ),
    ("action without name", evaluation(action={}), "action.name must be a non-empty string"),
    (
        "subject.type a number",
        evaluation(subject={**client(), "type": 1}),
        "subject.type must be a non-empty string",
    ),
    (
        "resource.id a boolean",
        evaluation(resource={**order(), "id": True}),
        "resource.id must be a non-empty string",
    ),
    (
        "action.name an object",
        evaluation(action={"name": {"x": 1}}),
        "action.name must be a non-empty string",
    ),
    ("action a string", evaluation(action="order:create"), "action must be a JSON object"),
    ("resource an array", evaluation(resource=[order()]), "resource must be a JSON object"),
    (
        "action.properties a string",
        evaluation(action={"name": "order:create", "properties": "x"}),
        "action.properties must be a JSON object",
    ),
    ("context a string", evaluation(context="eu"), "context must be a JSON object"),
]


@pytest.mark.parametrize(
    ("body", "description"), [c[1:] for c in MISSING], ids=[c[0] for c in MISSING]
)
@pytest.mark.parametrize("path", ["evaluation", "evaluations"])
async def test_a_missing_or_mistyped_required_member_is_400(
    server: Server, token: str, path: str, body: Any, description: str
) -> None:
    response = await post(server, path, body, token, **RID)

    assert response.status_code == 400, response.text
    assert response.json() == {"error": "invalid_request", "error_description": description}
    assert response.headers["x-request-id"] == "conf-1"  # §10.1.3, errors included


@pytest.mark.parametrize(
    ("body", "description"), [c[1:] for c in MISSING], ids=[c[0] for c in MISSING]
)
async def test_a_batch_item_without_a_required_member_is_400_naming_it(
    server: Server, token: str, body: Any, description: str
) -> None:
    """§7.1.1: a member omitted from an evaluation MUST be given at the top level; here the second
    evaluation is the bad one, and no default stands in for it."""
    batch = {"evaluations": [evaluation(), body]}

    response = await post(server, "evaluations", batch, token)

    assert response.status_code == 400, response.text
    assert response.json()["error_description"] == f"evaluations[1].{description}"


# --------------------------------------------------------------------------- batches (§7)


async def test_a_per_item_context_replaces_the_default_it_is_not_merged(
    server: Server, token: str
) -> None:
    """§7.1.1: a key given in an evaluation overrides the top-level default (the whole object): the
    item's context lacks ``currency``, so the policy's required attribute is missing there."""
    item_context = {k: v for k, v in CONTEXT.items() if k != "currency"}
    body = {**evaluation(), "evaluations": [{}, {"context": item_context}]}

    response = await post(server, "evaluations", body, token)

    results = response.json()["evaluations"]
    assert [r["decision"] for r in results] == [True, False]
    assert results[1]["context"]["reason_ids"] == ["missing_attribute"]


async def test_the_batch_answer_has_no_top_level_decision(server: Server, token: str) -> None:
    """§7.2: the decisions in request order under ``evaluations``; a top-level ``decision`` is
    RECOMMENDED to be omitted."""
    body = {**evaluation(), "evaluations": [{"resource": order(owner=OTHER_LEI)}, {}]}

    response = await post(server, "evaluations", body, token)

    assert list(response.json()) == ["evaluations"]
    assert [r["decision"] for r in response.json()["evaluations"]] == [False, True]


async def test_deny_on_first_deny_stops_at_an_error_too(server: Server, token: str) -> None:
    """§7.1.2.1: "any denial (error, or decision: false)" short-circuits: a fail-closed deny ends the
    answer like a policy deny."""
    broken = {k: v for k, v in CONTEXT.items() if k != "currency"}
    body = {
        **evaluation(),
        "evaluations": [{}, {"context": broken}, {}],
        "options": {"evaluations_semantic": "deny_on_first_deny"},
    }

    response = await post(server, "evaluations", body, token)

    results = response.json()["evaluations"]
    assert [r["decision"] for r in results] == [True, False]
    assert results[1]["context"]["reason_ids"] == ["missing_attribute"]


async def test_permit_on_first_permit_without_a_permit_answers_every_evaluation(
    server: Server, token: str
) -> None:
    denied = {"resource": order(owner=OTHER_LEI)}
    body = {
        **evaluation(),
        "evaluations": [denied, denied, denied],
        "options": {"evaluations_semantic": "permit_on_first_permit"},
    }

    response = await post(server, "evaluations", body, token)

    assert [r["decision"] for r in response.json()["evaluations"]] == [False, False, False]


# --------------------------------------------------------------------------- not served (§8, §10.1)


@pytest.mark.parametrize("kind", ["subject", "resource", "action"])
async def test_the_search_apis_are_not_served(server: Server, token: str, kind: str) -> None:
    """§8 is optional; §9.1.1: its endpoints' absence from the metadata tells the PEP. Their default
    paths (§10.1) answer 404 in the API's error shape, the request id echoed."""
    response = await post(server, f"search/{kind}", evaluation(), token, **RID)
    metadata = (await server.http.get("/.well-known/authzen-configuration")).json()

    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert response.headers["x-request-id"] == "conf-1"
    assert not [k for k in metadata if k.startswith("search_")]


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["evaluation", "evaluations"])
async def test_another_method_than_post_is_405_with_allow(
    server: Server, token: str, method: str, path: str
) -> None:
    """§10.1: every API request is a POST. RFC 9110 §15.5.6: a 405 names the allowed methods."""
    response = await server.http.request(
        method,
        f"/access/v1/{path}",
        headers={"Authorization": f"Bearer {token}", **RID},
    )

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == {
        "error": "invalid_request",
        "error_description": f"{method} is not allowed here: use POST",
    }
    assert response.headers["x-request-id"] == "conf-1"


# --------------------------------------------------------------------------- metadata (§9)


async def test_metadata_has_its_required_members_and_names_this_pdp(server: Server) -> None:
    """§9.1.1: ``policy_decision_point`` and ``access_evaluation_endpoint`` REQUIRED; §9.2.3: the
    identifier is the one the well-known URL was formed from (the issuer: no path here); §9.2.2:
    200 and application/json."""
    response = await server.http.get("/.well-known/authzen-configuration")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["policy_decision_point"] == server.issuer
    assert body["access_evaluation_endpoint"] == f"{server.issuer}/access/v1/evaluation"


# --------------------------------------------------------------------------- a failing PDP


async def test_a_pdp_without_a_bundle_denies(server: Server, token: str) -> None:
    """§7.2.1: decisions default to closed; a PDP that cannot decide answers ``false``, never
    ``true`` and never a 5xx the PEP might mistake."""
    engine = server.services.policy.engine
    bundle, engine.bundle = engine.bundle, None
    try:
        one = await post(server, "evaluation", evaluation(), token)
        many = await post(server, "evaluations", {**evaluation(), "evaluations": [{}, {}]}, token)
    finally:
        engine.bundle = bundle

    assert one.status_code == many.status_code == 200
    assert one.json()["decision"] is False
    assert one.json()["context"]["reason_ids"] == ["no_active_bundle"]
    assert [r["decision"] for r in many.json()["evaluations"]] == [False, False]


async def test_a_decision_that_cannot_be_recorded_is_a_deny(
    server: Server, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = server.services.policy.engine._recorder
    assert recorder is not None

    async def unavailable(*_: Any) -> None:
        raise ConnectionError("the database is gone")

    monkeypatch.setattr(recorder, "record", unavailable)
    response = await post(server, "evaluation", evaluation(), token)

    assert response.status_code == 200
    assert response.json()["decision"] is False
    assert response.json()["context"]["reason_ids"] == ["audit_unavailable"]


# --------------------------------------------------------------------------- what the ledger holds


async def integrated(server: Server, decision_id: str) -> tuple[str, str | None, str | None]:
    """The decision's ledger leaf (subject, client_id, transaction_id), once integrated."""
    for _ in range(50):
        await server.services.ledger.integrate_all()
        async with server.services.db.read() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT subject, client_id, transaction_id FROM audit_leaves "
                        "WHERE event_id = :id"
                    ),
                    {"id": decision_id},
                )
            ).first()
        if row is not None:
            return row[0], row[1], row[2]
        await asyncio.sleep(0.05)
    raise AssertionError(f"decision {decision_id} never reached the ledger")


async def test_the_longest_accepted_values_reach_the_ledger(server: Server, token: str) -> None:
    """A subject of ``MAX_SUBJECT_PART`` characters per part and a ``transaction_id`` of
    ``MAX_TRANSACTION_ID`` are decided and their ledger entry is integrated (on PostgreSQL a longer
    one failed every integration: the ledger stopped for everyone)."""
    kind, ident = "K" * wire.MAX_SUBJECT_PART, "c" * wire.MAX_SUBJECT_PART
    txn = "t" * wire.MAX_TRANSACTION_ID
    client_body = evaluation(subject={**client(), "id": ident}, transaction_id=txn)
    other = evaluation(subject={"type": kind, "id": ident})

    answers = [await post(server, "evaluation", b, token) for b in (client_body, other)]

    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    ids = [a.json()["context"]["decision_id"] for a in answers]
    assert await integrated(server, ids[0]) == (f'Client::"{ident}"', ident, txn)
    assert (await integrated(server, ids[1]))[0] == f'{kind}::"{ident}"'


TOO_LONG: list[tuple[str, dict[str, Any], str]] = [
    (
        "subject id",
        {"subject": {**client(), "id": "c" * (wire.MAX_SUBJECT_PART + 1)}},
        f"subject.id must be at most {wire.MAX_SUBJECT_PART} characters",
    ),
    (
        "subject type",
        {"subject": {"type": "K" * (wire.MAX_SUBJECT_PART + 1), "id": "c"}},
        f"subject.type must be at most {wire.MAX_SUBJECT_PART} characters",
    ),
    (
        "transaction_id",
        {"transaction_id": "t" * (wire.MAX_TRANSACTION_ID + 1)},
        f"transaction_id must be at most {wire.MAX_TRANSACTION_ID} characters",
    ),
    (
        "resource id",
        {"resource": {**order(), "id": "o" * (wire.MAX_ID_LENGTH + 1)}},
        f"resource.id must be at most {wire.MAX_ID_LENGTH} characters",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "description"), [c[1:] for c in TOO_LONG], ids=[c[0] for c in TOO_LONG]
)
async def test_a_value_the_ledger_cannot_hold_is_400_and_nothing_is_recorded(
    server: Server, token: str, overrides: dict[str, Any], description: str
) -> None:
    async with server.services.db.read() as conn:
        before = (await conn.execute(text("SELECT count(*) FROM policy_decisions"))).scalar_one()

    single = await post(server, "evaluation", evaluation(**overrides), token)
    batch = await post(
        server, "evaluations", {"evaluations": [evaluation(), evaluation(**overrides)]}, token
    )

    assert single.status_code == batch.status_code == 400, single.text
    assert single.json() == {"error": "invalid_request", "error_description": description}
    assert batch.json()["error_description"] == f"evaluations[1].{description}"
    async with server.services.db.read() as conn:
        after = (await conn.execute(text("SELECT count(*) FROM policy_decisions"))).scalar_one()
    assert after == before  # the batch's good first evaluation was not decided either


async def test_the_request_id_is_echoed_exactly(server: Server, token: str) -> None:
    """§10.1.3: "the PDP MUST include the same identifier in the response", also one longer than
    the recorded correlation id (cut there, never on the wire)."""
    long_id = "r" * 300

    one = await post(server, "evaluation", evaluation(), token, **{"X-Request-ID": long_id})
    many = await post(
        server,
        "evaluations",
        {**evaluation(), "evaluations": [{}]},
        token,
        **{"X-Request-ID": "b-1"},
    )

    assert one.headers["x-request-id"] == long_id
    assert many.headers["x-request-id"] == "b-1"


async def test_the_request_id_is_echoed_on_refusals_at_the_entry(
    server: Server, token: str
) -> None:
    """§10.1.3 holds for the answers the entry gives before any handler runs (trustplane.limits):
    a declared body over the AuthZEN cap (413) and a NUL in the request target (400)."""
    cap = server.services.settings.max_authzen_body_bytes
    too_large = b"{" + b" " * cap + b"}"

    large = await post(server, "evaluations", too_large, token, **RID)
    nul = await server.http.post(
        "/access/v1/evaluation?x=%00",
        json=evaluation(),
        headers={"Authorization": f"Bearer {token}", **RID},
    )

    assert (large.status_code, large.json()["error"]) == (413, "invalid_request")
    assert (nul.status_code, nul.json()["error"]) == (400, "invalid_request")
    assert large.headers["x-request-id"] == nul.headers["x-request-id"] == "conf-1"


# --------------------------------------------------------------------------- JSON text (§10.1.1, §11.5)

DUPLICATED: list[tuple[str, bytes]] = [
    (
        "a top-level member",
        b'{"subject": {"type": "Client", "id": "a"}, "subject": {"type": "Client", "id": "c-1"}}',
    ),
    ("an entity member", b'{"subject": {"type": "Client", "id": "a", "id": "c-1"}}'),
    ("an escaped name", b'{"action": {"name": "order:create", "n\\u0061me": "order:cancel"}}'),
    ("a batch item's member", b'{"evaluations": [{"context": {}, "context": {"x": 1}}]}'),
]


@pytest.mark.parametrize("raw", [c[1] for c in DUPLICATED], ids=[c[0] for c in DUPLICATED])
@pytest.mark.parametrize("path", ["evaluation", "evaluations"])
async def test_a_member_named_twice_is_400(
    server: Server, token: str, path: str, raw: bytes
) -> None:
    """§11.5 (I-JSON, RFC 7493 §2.3): member names are unique. The parser keeps one of two (the
    last), so a gateway that read the other would have let another request through: refused."""
    response = await post(server, path, raw, token)

    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "the request body names a member twice in one object",
    }


async def test_the_same_name_in_different_objects_is_not_a_repeat(
    server: Server, token: str
) -> None:
    """``type``/``id`` in every entity, a value holding ``":`` and spaces before a colon: none is a
    repeated member."""
    body = evaluation(transaction_id='txn "quoted": value')
    raw = json.dumps(body).encode().replace(b'"action":', b'"action" :\n ')

    response = await post(server, "evaluation", raw, token)

    assert response.status_code == 200, response.text
    assert response.json()["decision"] is True


async def test_unknown_members_are_ignored(server: Server, token: str) -> None:
    """§10.1.1: receivers MUST ignore unknown fields (top level, entity, action, options)."""
    body = {
        **evaluation(),
        "future_member": {"x": 1},
        "action": {"name": "order:create", "future": True},
        "evaluations": [{"resource": {**order(), "future": [1]}}],
        "options": {"evaluations_semantic": "execute_all", "another_option": "value"},
    }

    response = await post(server, "evaluations", body, token)

    assert response.status_code == 200, response.text
    assert [r["decision"] for r in response.json()["evaluations"]] == [True]


UNSTORABLE: list[tuple[str, bytes, str]] = [
    (
        "a NUL in an id",
        b'{"subject": {"type": "Client", "id": "c-1\\u0000"}}',
        "a string in the request body holds a NUL character",
    ),
    (
        "an unpaired surrogate",
        b'{"context": {"note": "\\ud800"}}',
        "a string in the request body holds an unpaired surrogate",
    ),
]


@pytest.mark.parametrize(
    ("raw", "description"), [c[1:] for c in UNSTORABLE], ids=[c[0] for c in UNSTORABLE]
)
async def test_text_postgresql_cannot_store_is_400_and_nothing_is_recorded(
    server: Server, token: str, raw: bytes, description: str
) -> None:
    """§11.5: UTF-8 without unpaired surrogates; a NUL, which no ``text`` column holds, is refused
    as the body is read (trustplane.limits), before any decision is made or recorded."""
    async with server.services.db.read() as conn:
        before = (await conn.execute(text("SELECT count(*) FROM policy_decisions"))).scalar_one()

    response = await post(server, "evaluation", raw, token, **RID)

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert description in response.json()["error_description"]
    assert response.headers["x-request-id"] == "conf-1"
    async with server.services.db.read() as conn:
        after = (await conn.execute(text("SELECT count(*) FROM policy_decisions"))).scalar_one()
    assert after == before
