"""The token endpoint's single durable write: the assertion's jti and the audit record together."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from sqlalchemy.ext.asyncio import AsyncConnection

from tests.conftest import EXECUTION, ClientKit
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.errors import InvalidClientError, InvalidGrantError, OAuth2Error
from trustplane.grant.outcomes import ConsumeJti, NotRevoked, Outcome
from trustplane.protocol.replay import ReplayUse
from trustplane.protocol.revocations import SqlRevocationStore


async def revoke(conn: AsyncConnection, jti: str) -> None:
    await SqlRevocationStore().revoke(conn, jti, "c", 2**40)


def _refused(jti: str) -> Callable[[OAuth2Error], AuditEvent]:
    """The refusal record of a failed condition, naming the condition's error."""

    def refused(error: OAuth2Error) -> AuditEvent:
        return AuditEvent(
            type=AuditEventType.TOKEN_REFUSED,
            issuer="http://127.0.0.1:8000",
            client_id="c",
            jti=jti,
            decision="deny",
            reason=error.error,
        )

    return refused


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
    replay = InvalidClientError("client assertion was already used")
    use = ConsumeJti(ReplayUse("client-a", "jti-1", 2**40), replay)
    outcomes = [
        Outcome(
            event=_event(AuditEventType.TOKEN_ISSUED, f"t{i}"),
            refused=_refused(f"r{i}"),
            conditions=(use,),
        )
        for i in range(2)
    ]
    failed = await asyncio.gather(*(services.writer.submit("token_outcome", o) for o in outcomes))

    assert failed == [None, use]
    issued = await recent_events(services.db, type_="oauth:token:issued")
    refused = await recent_events(services.db, type_="oauth:token:refused")
    assert [e["jti"] for e in issued] == ["t0"]
    assert [e["jti"] for e in refused] == ["r1"]


async def test_a_grant_assertion_replayed_within_one_batch_records_one_issue_and_one_refusal(
    services: Services,
) -> None:
    """Two requests with fresh client assertions but one partner assertion (jwt-bearer grant)."""
    replay = InvalidGrantError("the assertion was already used")
    grant_use = ConsumeJti(
        ReplayUse("partner-assertion:https://idp.example", "p-jti", 2**40), replay
    )
    outcomes = [
        Outcome(
            event=_event(AuditEventType.TOKEN_ISSUED, f"t{i}"),
            refused=_refused(f"grant-replay-{i}"),
            conditions=(
                ConsumeJti(ReplayUse("client-a", f"c-jti-{i}", 2**40), InvalidClientError()),
                grant_use,
            ),
        )
        for i in range(2)
    ]
    results = await asyncio.gather(*(services.writer.submit("token_outcome", o) for o in outcomes))

    assert results == [None, grant_use]
    issued = await recent_events(services.db, type_="oauth:token:issued")
    refused = await recent_events(services.db, type_="oauth:token:refused")
    assert [e["jti"] for e in issued] == ["t0"]
    assert [e["jti"] for e in refused] == ["grant-replay-1"]


async def test_the_first_failed_condition_decides_and_every_jti_is_still_consumed(
    services: Services,
) -> None:
    """A replayed client assertion refuses as such even when the grant's own conditions fail too;
    the grant's assertion is consumed all the same (single-use whatever the outcome)."""
    client_use = ReplayUse("client-b", "c-jti", 2**40)
    grant_use = ReplayUse("partner-assertion:https://idp.example", "g-jti", 2**40)
    async with services.db.transaction() as conn:
        await revoke(conn, "subject-jti")
    await services.writer.submit("replay", client_use)
    client_replay = ConsumeJti(client_use, InvalidClientError("client assertion was already used"))
    revoked = NotRevoked(
        "subject-jti", lambda: InvalidGrantError("the subject_token has been revoked")
    )
    outcome = Outcome(
        event=_event(AuditEventType.TOKEN_ISSUED, "t"),
        refused=_refused("refused"),
        conditions=(client_replay, ConsumeJti(grant_use, InvalidGrantError()), revoked),
    )

    assert await services.writer.submit("token_outcome", outcome) is client_replay
    again = Outcome(
        event=_event(AuditEventType.TOKEN_ISSUED, "t2"),
        refused=_refused("refused-2"),
        conditions=(ConsumeJti(grant_use, InvalidGrantError("used")),),
    )
    failed = await services.writer.submit("token_outcome", again)
    assert failed is not None
    assert failed.error.description == "used"
    refused = await recent_events(services.db, type_="oauth:token:refused")
    assert [(e["jti"], e["reason"]) for e in refused] == [
        ("refused-2", "invalid_grant"),
        ("refused", "invalid_client"),
    ]
    assert await recent_events(services.db, type_="oauth:token:issued") == []


async def test_a_revoked_token_the_grant_rests_on_refuses_with_its_condition_error(
    services: Services,
) -> None:
    async with services.db.transaction() as conn:
        await revoke(conn, "gone")
    built: list[str] = []

    def refusal(jti: str) -> Callable[[], InvalidGrantError]:
        def build() -> InvalidGrantError:
            built.append(jti)
            return InvalidGrantError(f"{jti} revoked")

        return build

    live, gone = (NotRevoked(jti, refusal(jti)) for jti in ("live", "gone"))
    outcomes = [
        Outcome(
            event=_event(AuditEventType.TOKEN_ISSUED, f"t{i}"),
            refused=_refused(f"r{i}"),
            conditions=(condition,),
        )
        for i, condition in enumerate((live, gone))
    ]
    failed = await asyncio.gather(*(services.writer.submit("token_outcome", o) for o in outcomes))

    assert failed == [None, gone]
    # the refusal is built only for the revoked token, once, and is the error the outcome names
    assert built == ["gone"]
    assert gone.error is gone.error
    assert gone.error.description == "gone revoked"
    issued = await recent_events(services.db, type_="oauth:token:issued")
    refused = await recent_events(services.db, type_="oauth:token:refused")
    assert [e["jti"] for e in issued] == ["t0"]
    assert [(e["jti"], e["reason"]) for e in refused] == [("r1", "invalid_grant")]


async def test_the_outcome_is_not_visible_before_the_batch_commits(services: Services) -> None:
    """The jti, the decision row (on PostgreSQL both sent straight to the driver, in one
    statement) and the ledger entry are written in the batch's transaction: a handler that runs
    after them in the same batch, looking through another connection, sees none of them; after
    the commit all are there."""
    from sqlalchemy import text

    from trustplane.policy.recorder import DecisionRecord

    decision = AuditEvent(
        type=AuditEventType.POLICY_DECISION_ALLOWED,
        issuer="http://127.0.0.1:8000",
        client_id="c",
        decision="allow",
    )
    outcome = Outcome(
        event=_event(AuditEventType.TOKEN_ISSUED, "t-visible"),
        refused=_refused("r-visible"),
        conditions=(ConsumeJti(ReplayUse("client-v", "jti-v", 2**40), InvalidClientError("x")),),
        decisions=(DecisionRecord(decision, "token:obtain", "order:create", 0, "{}"),),
    )
    probe = text(
        "SELECT (SELECT count(*) FROM used_jtis WHERE jti = 'jti-v'),"
        " (SELECT count(*) FROM policy_decisions WHERE decision_id = :decision)"
    ).bindparams(decision=decision.event_id)

    async def seen() -> tuple[int, int]:
        async with services.db.read() as conn:
            row = (await conn.execute(probe)).one()
        return int(row[0]), int(row[1])

    async def look(_conn: AsyncConnection, payloads: list[object]) -> list[tuple[int, int]]:
        return [await seen() for _ in payloads]

    services.writer.register("look", look)
    failed, during = await asyncio.gather(
        services.writer.submit("token_outcome", outcome), services.writer.submit("look", None)
    )

    assert failed is None
    assert during == (0, 0)
    assert await seen() == (1, 1)
    issued = await recent_events(services.db, type_="oauth:token:issued")
    assert [e["jti"] for e in issued] == ["t-visible"]


async def test_a_consumed_jti_builds_its_refusal_only_when_it_was_used_before(
    services: Services,
) -> None:
    """The token endpoint consumes a client assertion's jti on every request: its refusal is built
    only for the replay, once, and is the error recorded and answered; a first use builds none."""
    built: list[str] = []

    def refusal() -> InvalidClientError:
        built.append("replay")
        return InvalidClientError("client assertion was already used")

    first, again = (ConsumeJti(ReplayUse("client-l", "lazy-jti", 2**40), refusal) for _ in "ab")
    outcomes = [
        Outcome(
            event=_event(AuditEventType.TOKEN_ISSUED, f"l{i}"),
            refused=_refused(f"lr{i}"),
            conditions=(condition,),
        )
        for i, condition in enumerate((first, again))
    ]
    assert await services.writer.submit("token_outcome", outcomes[0]) is None
    assert built == []
    assert await services.writer.submit("token_outcome", outcomes[1]) is again
    assert built == ["replay"]
    assert again.error is again.error
    assert again.error.description == "client assertion was already used"
    refused = await recent_events(services.db, type_="oauth:token:refused")
    assert [(e["jti"], e["reason"]) for e in refused] == [("lr1", "invalid_client")]
