"""Enforcement at the token endpoint: the PDP decides per scope; a deny is ``invalid_scope`` (RFC 6749
§5.2) with the deny recorded next to the refusal; allows are recorded next to the issuance."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from tests.conftest import ClientKit, register_kit
from tests.policy.test_store import variant
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.errors import InvalidClientError
from trustplane.grant.outcomes import ConsumeJti, Outcome
from trustplane.policy.bundle import BundleSource, default_bundle
from trustplane.policy.enforcement import TokenPolicy
from trustplane.policy.tables import policy_decisions
from trustplane.protocol.replay import ReplayUse
from trustplane.storage.writer import WriterUnavailable

ALLOCATION = "https://allocation.example/api"
EXECUTION = "https://execution.example/api"


async def token(
    http: httpx.AsyncClient, kit: ClientKit, scope: str, resource: str
) -> httpx.Response:
    data = {"grant_type": "client_credentials", "scope": scope, "resource": resource, **kit.auth()}
    return await http.post("/token", data=data)


async def decisions(services: Services) -> list[Any]:
    async with services.db.read() as conn:
        query = select(policy_decisions).order_by(policy_decisions.c.time_ms)
        return list(await conn.execute(query))


def cache(result: str) -> float:
    return (
        REGISTRY.get_sample_value("trustplane_policy_token_cache_total", {"result": result}) or 0.0
    )


async def test_four_eyes_deny_is_invalid_scope_and_recorded(
    services: Services, http: httpx.AsyncClient
) -> None:
    kit = await register_kit(
        services,
        scope="allocation:propose allocation:approve",
        allowed_resources=[ALLOCATION],
    )
    response = await token(http, kit, "allocation:propose allocation:approve", ALLOCATION)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"
    assert "policy" in response.json()["error_description"]

    events = await recent_events(services.db, 10)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e)
    refused = by_type["oauth:token:refused"][0]
    assert refused["reason"] == "invalid_scope"
    assert "token.four_eyes_allocation" in refused["payload"]["detail"]
    denied = by_type["policy:decision:denied"][0]
    assert denied["reason_ids"] == ["token.four_eyes_allocation"]
    assert denied["client_id"] == kit.client_id
    assert denied["payload"]["resource"] == 'Scope::"allocation:approve"'
    assert (
        by_type["policy:decision:allowed"][0]["payload"]["resource"]
        == 'Scope::"allocation:propose"'
    )

    rows = await decisions(services)
    assert sorted((r.resource, r.allowed) for r in rows) == [
        ('Scope::"allocation:approve"', False),
        ('Scope::"allocation:propose"', True),
    ]
    inputs = orjson.loads(rows[0].inputs)
    assert inputs["request"]["context"]["requested_scopes"] == [
        "allocation:propose",
        "allocation:approve",
    ]

    alone = await token(http, kit, "allocation:approve", ALLOCATION)
    assert alone.status_code == 200, alone.text


async def test_issuance_records_the_allow_with_it(
    services: Services, http: httpx.AsyncClient
) -> None:
    kit = await register_kit(services)
    response = await token(http, kit, "order:create order:cancel", EXECUTION)
    assert response.status_code == 200, response.text
    events = [
        e
        for e in await recent_events(services.db, 20)
        if e["type"].startswith(("oauth:token", "policy:decision"))
    ]
    assert sorted(e["type"] for e in events) == [
        "oauth:token:issued",
        "policy:decision:allowed",
        "policy:decision:allowed",
    ]
    allowed = [e for e in events if e["type"] == "policy:decision:allowed"]
    assert {e["policy_bundle_version"] for e in allowed} == {default_bundle().version}
    assert {tuple(e["reason_ids"]) for e in allowed} == {("token.registered_scope",)}


async def test_cached_decisions_are_still_recorded_and_a_bundle_switch_misses(
    services: Services, http: httpx.AsyncClient
) -> None:
    kit = await register_kit(services)
    hits, misses = cache("hit"), cache("miss")
    for _ in range(3):
        assert (await token(http, kit, "order:create", EXECUTION)).status_code == 200
    assert (cache("hit") - hits, cache("miss") - misses) == (2, 1)
    rows = await decisions(services)
    assert len(rows) == 3
    assert len({r.decision_id for r in rows}) == 3
    # a cached decision recorded again gets a time-ordered id of its own too (UUIDv7)
    assert {uuid.UUID(hex=r.decision_id).version for r in rows} == {7}

    v1 = (await services.policy.publish(variant(1), "CR-1", "alice")).record.version
    await services.policy.activate(v1, "alice", "CR-1")
    assert (await token(http, kit, "order:create", EXECUTION)).status_code == 200
    assert cache("miss") - misses == 2
    assert (await decisions(services))[-1].bundle_version == v1


async def test_an_activated_bundle_that_forbids_a_scope_refuses_it(
    services: Services, http: httpx.AsyncClient
) -> None:
    kit = await register_kit(services)
    assert (await token(http, kit, "order:cancel", EXECUTION)).status_code == 200
    files = dict(default_bundle().files)
    files["freeze.cedar"] = (
        '@id("token.freeze_cancels")\nforbid (principal, action == Action::"token:obtain", resource)'
        '\nwhen { resource.name == "order:cancel" };\n'
    )
    files["tests/freeze.yaml"] = files["tests/default.yaml"].split("\ncases:")[0] + (
        "\ncases:\n  - name: cancel frozen\n    principal: *nw_client\n    action: token:obtain\n"
        "    resource: {type: Scope, id: order:cancel, attributes: {name: order:cancel, audience: x}}\n"
        "    context: {audience: x, requested_scopes: [order:cancel], grant_type: client_credentials}\n"
        "    expect: deny\n    reasons: [token.freeze_cancels]\n"
    )
    frozen = (await services.policy.publish(BundleSource(files), "CR-77", "ops")).record.version
    await services.policy.activate(frozen, "ops", "CR-77")
    response = await token(http, kit, "order:cancel", EXECUTION)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_scope")
    assert (await token(http, kit, "order:create", EXECUTION)).status_code == 200
    await services.policy.rollback("ops", "CR-77")
    assert (await token(http, kit, "order:cancel", EXECUTION)).status_code == 200


async def test_a_disabled_engine_bundle_fails_closed(
    services: Services, http: httpx.AsyncClient
) -> None:
    """No active bundle in memory (e.g. it could not be loaded): every scope is refused."""
    kit = await register_kit(services)
    services.policy.engine.bundle = None
    response = await token(http, kit, "order:create", EXECUTION)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_scope")
    denied = await recent_events(services.db, 5, "policy:decision:denied")
    assert denied[0]["reason_ids"] == ["no_active_bundle"]


async def test_decisions_and_issuance_commit_together_or_not_at_all(services: Services) -> None:
    """The decision records ride in the outcome's transaction: if they cannot be written, neither
    is the issuance (nor the jti), and the request fails closed."""
    client = services.clients.registry.get((await register_kit(services)).client_id)
    assert client is not None
    records = TokenPolicy(services.policy.engine).check(client, ("order:create",), EXECUTION, "cc")

    def issued(jti: str) -> AuditEvent:
        return AuditEvent(type=AuditEventType.TOKEN_ISSUED, issuer="i", client_id="c", jti=jti)

    def use(jti: str) -> tuple[ConsumeJti, ...]:
        return (ConsumeJti(ReplayUse(client.client_id, jti, 2**40), InvalidClientError()),)

    first = Outcome(
        event=issued("t-1"),
        refused=lambda _: issued("x"),
        conditions=use("jti-1"),
        decisions=records,
    )
    assert await services.writer.submit("token_outcome", first) is None
    # The same decision records again: their insert fails, so the whole outcome must fail.
    second = Outcome(
        event=issued("t-2"),
        refused=lambda _: issued("x"),
        conditions=use("jti-2"),
        decisions=records,
    )
    with pytest.raises(WriterUnavailable):
        await services.writer.submit("token_outcome", second)
    events = await recent_events(services.db, 50, "oauth:token:issued")
    assert [e["jti"] for e in events] == ["t-1"]
    assert len(await decisions(services)) == 1
    replay = Outcome(event=issued("t-3"), refused=lambda _: issued("x"), conditions=use("jti-2"))
    # jti-2 was not consumed
    assert await services.writer.submit("token_outcome", replay) is None


async def test_a_fail_closed_deny_is_not_cached(
    services: Services, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine error refuses the scope once; the next request is decided again and succeeds."""
    from trustplane.policy import engine as engine_module

    kit = await register_kit(services)
    real = engine_module.authorize_batch

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("engine crashed")

    monkeypatch.setattr(engine_module, "authorize_batch", broken)
    refused = await token(http, kit, "order:create", EXECUTION)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_scope")
    monkeypatch.setattr(engine_module, "authorize_batch", real)
    assert (await token(http, kit, "order:create", EXECUTION)).status_code == 200
    denied = await recent_events(services.db, 5, "policy:decision:denied")
    assert denied[0]["reason_ids"] == ["engine_error"]
