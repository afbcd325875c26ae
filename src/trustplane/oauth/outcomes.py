"""The token endpoint's one durable write per request: the client assertion's ``jti`` and the audit
record of what was decided, committed together through the group-commit writer.

Either both are durable or neither is, and a request pays for one round trip to the writer instead of
two. The ``jti`` is consumed whatever the decision (an assertion is single-use even when the request
it came with is refused); if it had already been used, the request is refused as a replay and the
replay, not the original decision, is what the audit record says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.events import AuditEvent, AuditEventType
from trustplane.audit.sink import write_events
from trustplane.oauth.replay import ReplayUse, consume_batch
from trustplane.policy.recorder import DecisionRecord, write_decisions
from trustplane.storage.writer import GroupCommitWriter

log = structlog.get_logger("trustplane.audit")
KIND = "token_outcome"


@dataclass(frozen=True, slots=True)
class Outcome:
    """``use``: the jti still to consume (None if there is none or it was consumed already).
    ``event`` is recorded if the use wins; ``replay_event()`` builds what is recorded instead if the
    jti had been used before (built only then: replays are rare, the happy path should not pay).
    ``decisions``: the policy decisions taken for this request, recorded in the same transaction
    whatever the outcome (a decision was made even if the request then turned out to be a replay)."""

    use: ReplayUse | None
    event: AuditEvent
    replay_event: Callable[[], AuditEvent]
    decisions: tuple[DecisionRecord, ...] = ()


async def record_batch(conn: AsyncConnection, outcomes: Sequence[Outcome]) -> list[bool]:
    """Batch handler: one replay upsert for every use, then one insert for the chosen events."""
    uses = [o.use for o in outcomes if o.use is not None]
    flags = iter(await consume_batch(conn, uses) if uses else [])
    won = [next(flags) if o.use is not None else True for o in outcomes]
    await write_events(
        conn, [o.event if w else o.replay_event() for o, w in zip(outcomes, won, strict=True)]
    )
    decisions = [d for o in outcomes for d in o.decisions]
    if decisions:
        await write_decisions(conn, decisions)
    return won


class OutcomeRecorder:
    def __init__(self, writer: GroupCommitWriter) -> None:
        self._writer = writer
        writer.register(KIND, record_batch)

    async def record(self, outcome: Outcome) -> bool:
        """Durably record the outcome; False if the assertion turned out to be a replay."""
        won = bool(await self._writer.submit(KIND, outcome))
        event = outcome.event
        if not won:
            refused = AuditEventType.TOKEN_REFUSED.value
            log.info(
                refused, client_id=event.client_id, jti=event.jti, reason="invalid_client: replay"
            )
        elif event.decision == "deny":
            log.info(
                event.type.value, client_id=event.client_id, jti=event.jti, reason=event.reason
            )
        return won
