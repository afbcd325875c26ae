"""The token endpoint's single durable write: the assertion's jti and the audit record together."""

from __future__ import annotations

import asyncio
from functools import partial

import httpx

from tests.conftest import EXECUTION, ClientKit
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.oauth.outcomes import Outcome, Recorded
from trustplane.protocol.replay import ReplayUse


def _event(kind: AuditEventType, jti: str) -> AuditEvent:
    return AuditEvent(
        type=kind,
        issuer="http://127.0.0.1:8000",
        client_id="c",
        jti=jti,
        decision="allow" if kind is AuditEventType.TOKEN_ISSUED else "deny",
    )


async def test_a_refused_request_still_consumes_its_assertion(
    http: httpx.AsyncClient, kit: ClientKit, services: Services
) -> None:
    auth = kit.auth()

    async def token(scope: str) -> httpx.Response:
        form = {"grant_type": "client_credentials", "scope": scope, "resource": EXECUTION}
        return await http.post("/token", data={**form, **auth})

    bad, again = await token("report:view"), await token("order:create")

    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_scope")
    assert (again.status_code, again.json()["error"]) == (401, "invalid_client")
    refused = await recent_events(services.db, type_="oauth:token:refused")
    assert [e["reason"] for e in refused[:2]] == ["invalid_client", "invalid_scope"]
    assert refused[0]["client_id"] == refused[1]["client_id"] == kit.client_id
    assert await recent_events(services.db, type_="oauth:token:issued") == []


async def test_one_batch_with_the_same_jti_twice_records_one_issue_and_one_replay(
    services: Services,
) -> None:
    use = ReplayUse("client-a", "jti-1", 2**40)
    outcomes = [
        Outcome(
            use,
            _event(AuditEventType.TOKEN_ISSUED, f"t{i}"),
            partial(_event, AuditEventType.TOKEN_REFUSED, f"r{i}"),
        )
        for i in range(2)
    ]
    won = await asyncio.gather(*(services.writer.submit("token_outcome", o) for o in outcomes))

    assert won == [True, False]
    issued = await recent_events(services.db, type_="oauth:token:issued")
    refused = await recent_events(services.db, type_="oauth:token:refused")
    assert [e["jti"] for e in issued] == ["t0"]
    assert [e["jti"] for e in refused] == ["r1"]


async def test_a_grant_assertion_replayed_within_one_batch_records_one_issue_and_one_refusal(
    services: Services,
) -> None:
    """Two requests with fresh client assertions but one partner assertion (jwt-bearer grant)."""
    grant_use = ReplayUse("partner-assertion:https://idp.example", "p-jti", 2**40)
    outcomes = [
        Outcome(
            ReplayUse("client-a", f"c-jti-{i}", 2**40),
            _event(AuditEventType.TOKEN_ISSUED, f"t{i}"),
            partial(_event, AuditEventType.TOKEN_REFUSED, f"client-replay-{i}"),
            grant_use,
            partial(_event, AuditEventType.TOKEN_REFUSED, f"grant-replay-{i}"),
        )
        for i in range(2)
    ]
    results = await asyncio.gather(*(services.writer.submit("token_outcome", o) for o in outcomes))

    assert results == [Recorded.RECORDED, Recorded.GRANT_REPLAYED]
    issued = await recent_events(services.db, type_="oauth:token:issued")
    refused = await recent_events(services.db, type_="oauth:token:refused")
    assert [e["jti"] for e in issued] == ["t0"]
    assert [e["jti"] for e in refused] == ["grant-replay-1"]
