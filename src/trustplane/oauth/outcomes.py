"""The token endpoint's one durable write per request: the client assertion's ``jti`` (and the
grant's own single-use assertion, e.g. a partner's JWT-bearer assertion) and the audit record of what
was decided, committed together through the group-commit writer.

Either all are durable or none is, and a request pays for one round trip to the writer instead of
two. The ``jti`` is consumed whatever the decision (an assertion is single-use even when the request
it came with is refused); if it had already been used, the request is refused as a replay and the
replay, not the original decision, is what the audit record says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.sink import write_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.policy.recorder import DecisionRecord, write_decisions
from trustplane.protocol.replay import ReplayUse, consume_batch
from trustplane.protocol.revocations import revoked_among
from trustplane.storage.writer import GroupCommitWriter

log = structlog.get_logger("trustplane.audit")
KIND = "token_outcome"


class Recorded(IntEnum):
    """What :meth:`OutcomeRecorder.record` found. ``REPLAYED``/``RECORDED`` compare equal to
    False/True (the client assertion lost / every use won)."""

    REPLAYED = 0
    RECORDED = 1
    #: The client assertion was fresh but the grant's own assertion had been used before.
    GRANT_REPLAYED = 2
    #: A token the grant rests on (a token exchange's subject token) was revoked (RFC 7009).
    REVOKED = 3


@dataclass(frozen=True, slots=True)
class Outcome:
    """``use``: the client assertion's jti still to consume (None if there is none or it was
    consumed already); ``grant_use``: the grant's own assertion jti, if the grant has one.
    ``event`` is recorded if every use wins; ``replay_event()`` / ``grant_replay_event()`` build what
    is recorded instead (built only then: replays are rare, the happy path should not pay).
    ``decisions``: the policy decisions taken for this request, recorded in the same transaction
    whatever the outcome (a decision was made even if the request then turned out to be a replay)."""

    use: ReplayUse | None
    event: AuditEvent
    replay_event: Callable[[], AuditEvent]
    grant_use: ReplayUse | None = None
    grant_replay_event: Callable[[], AuditEvent] | None = None
    decisions: tuple[DecisionRecord, ...] = ()
    #: jtis of tokens that must not be revoked for ``event`` to stand (checked in the same
    #: transaction: one query per batch instead of one read per request); ``revoked_event()`` is
    #: recorded instead if one is.
    unrevoked: tuple[str, ...] = ()
    revoked_event: Callable[[], AuditEvent] | None = None


def _result(client_won: bool, grant_won: bool, revoked: bool) -> Recorded:
    if not client_won:
        return Recorded.REPLAYED
    if not grant_won:
        return Recorded.GRANT_REPLAYED
    return Recorded.REVOKED if revoked else Recorded.RECORDED


async def record_batch(conn: AsyncConnection, outcomes: Sequence[Outcome]) -> list[Recorded]:
    """Batch handler: one replay upsert for every use, one revocation query for every token the
    outcomes rest on, then one insert for the chosen events."""
    uses = [u for o in outcomes for u in (o.use, o.grant_use) if u is not None]
    flags = iter(await consume_batch(conn, uses) if uses else [])
    jtis = {j for o in outcomes for j in o.unrevoked}
    revoked = await revoked_among(conn, jtis) if jtis else set()
    results = [
        _result(
            next(flags) if o.use is not None else True,
            next(flags) if o.grant_use is not None else True,
            any(j in revoked for j in o.unrevoked),
        )
        for o in outcomes
    ]
    await write_events(conn, [_chosen(o, r) for o, r in zip(outcomes, results, strict=True)])
    decisions = [d for o in outcomes for d in o.decisions]
    if decisions:
        await write_decisions(conn, decisions)
    return results


def _chosen(outcome: Outcome, result: Recorded) -> AuditEvent:
    if result is Recorded.RECORDED:
        return outcome.event
    if result is Recorded.GRANT_REPLAYED and outcome.grant_replay_event is not None:
        return outcome.grant_replay_event()
    if result is Recorded.REVOKED and outcome.revoked_event is not None:
        return outcome.revoked_event()
    return outcome.replay_event()


class OutcomeRecorder:
    def __init__(self, writer: GroupCommitWriter) -> None:
        self._writer = writer
        writer.register(KIND, record_batch)

    async def record(self, outcome: Outcome) -> Recorded:
        """Durably record the outcome; say whether an assertion turned out to be a replay."""
        result = Recorded(await self._writer.submit(KIND, outcome))
        event = outcome.event
        if result is not Recorded.RECORDED:
            refused = AuditEventType.TOKEN_REFUSED.value
            reason = {
                Recorded.REPLAYED: "client assertion replay",
                Recorded.GRANT_REPLAYED: "grant assertion replay",
            }.get(result, "revoked subject token")
            log.info(refused, client_id=event.client_id, jti=event.jti, reason=reason)
        elif event.decision == "deny":
            log.info(
                event.type.value, client_id=event.client_id, jti=event.jti, reason=event.reason
            )
        return result
