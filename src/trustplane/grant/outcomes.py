"""The token endpoint's one durable write per request: the single-use things the request rests on,
the policy decisions and the audit record of what was decided, committed together through the
group-commit writer.

What must hold for an issuance to stand is a tuple of small :data:`Condition` s, each with the
error to answer if it fails: the client assertion's ``jti`` (and a grant's own single-use
assertion, e.g. a partner's JWT-bearer assertion) not used before (:class:`ConsumeJti`), the token a
grant rests on (a token exchange's subject token) not revoked (:class:`NotRevoked`). They are
evaluated in the writer's batch: one replay upsert for every ``jti`` of the batch, one revocation
query for every token the batch rests on, then one insert for the chosen events.

On PostgreSQL the common batch is one statement (:func:`record_alone`), sent on the writer's
autocommit connection with no ``BEGIN`` or ``COMMIT``: the ``jti`` upsert with the decisions'
inputs, the ledger's pending rows of the "issued" events and the audit-sink observers' rows (the
SSF derivation index of a token exchange) as data-modifying CTEs, and a last step that fails the
statement unless every ``jti`` was fresh and no token the batch rests on is revoked (read in the
statement's snapshot). One round trip, atomic and durable when it returns (``synchronous_commit``
on). A batch with a ``jti`` already used or a revoked token writes nothing there and runs the
transactional way (:func:`record_batch`), which records the refusals; so does one whose events an
observer would write for other than as such an insert. That way (SQLite's too) a batch is
``BEGIN``, the upsert (the decisions' inputs riding in its statement on PostgreSQL: they are
recorded whatever the upsert finds), the revocation query if any, the ledger insert and
``COMMIT``.

Either all are durable or none is, and a request pays for one round trip to the writer instead of
several. Every ``jti`` is consumed whatever the decision (an assertion is single-use even when the
request it came with is refused); if a condition fails, the request is refused with that
condition's error, and the refusal, not the original decision, is what the audit record says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.sink import (
    APPEND_WAKES,
    APPENDED,
    observer_inserts,
    pending_row,
    write_events,
)
from trustplane.audit.store import pg_pending_insert
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.errors import OAuth2Error
from trustplane.policy.recorder import DecisionRecord, pg_inputs_insert, write_inputs
from trustplane.protocol.replay import (
    Replayed,
    ReplayUse,
    claim_all,
    consume_batch,
    consume_on_driver,
)
from trustplane.protocol.revocations import revoked_among
from trustplane.storage.driver_sql import in_transaction
from trustplane.storage.writer import GroupCommitWriter

log = structlog.get_logger("trustplane.audit")
KIND = "token_outcome"


@dataclass(frozen=True, slots=True)
class ConsumeJti:
    """An assertion's ``jti`` (RFC 7523 §3 item 7): holds if this is its first use.

    ``refusal`` is the error to answer if it was used before, or a function that builds it, called
    only then (:attr:`error`, once): the token endpoint's client assertion is consumed on every
    request, and an error built per request only to be dropped is allocation and collector work."""

    kind: ClassVar[str] = "consume_jti"
    key: ReplayUse
    refusal: OAuth2Error | Callable[[], OAuth2Error]
    _error: OAuth2Error | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def error(self) -> OAuth2Error:
        error = self._error
        if error is None:
            refusal = self.refusal
            error = refusal if isinstance(refusal, OAuth2Error) else refusal()
            object.__setattr__(self, "_error", error)  # frozen: set once, on first use
        return error


@dataclass(frozen=True, slots=True)
class NotRevoked:
    """One of our tokens (by ``jti``) the grant rests on: holds if it is not revoked (RFC 7009).

    ``refusal`` builds the error to answer if it is revoked, only then (:attr:`error`, once): an
    exception and its attributes built for every exchange, to be dropped unused by nearly all of
    them, were two more container objects alive per request in flight (``docs/token_exchange.md``)."""

    kind: ClassVar[str] = "not_revoked"
    key: str
    refusal: Callable[[], OAuth2Error]
    _error: OAuth2Error | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def error(self) -> OAuth2Error:
        error = self._error
        if error is None:
            error = self.refusal()
            object.__setattr__(self, "_error", error)  # frozen: set once, on first use
        return error


Condition = ConsumeJti | NotRevoked


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """``event`` is recorded if every condition holds; otherwise ``refused(error)`` of the first
    that failed (built only then: failures are rare, the happy path should not pay).
    ``decisions``: the policy decisions taken for this request, recorded in the same transaction
    whatever the outcome (a decision was made even if the request then turned out to be a replay)."""

    event: AuditEvent
    refused: Callable[[OAuth2Error], AuditEvent]
    conditions: tuple[Condition, ...] = ()
    decisions: tuple[DecisionRecord, ...] = ()


async def record_batch(
    conn: AsyncConnection, outcomes: Sequence[Outcome]
) -> list[Condition | None]:
    """Batch handler: the first failed condition of each outcome (None: all hold). Every ``jti``
    is consumed, also those of an outcome whose earlier condition failed."""
    uses = [c.key for o in outcomes for c in o.conditions if isinstance(c, ConsumeJti)]
    decisions = [d for o in outcomes for d in o.decisions]
    driver = await in_transaction(conn) if uses else None
    if driver is not None:  # PostgreSQL: the decisions' inputs ride in the upsert's statement
        alongside = pg_inputs_insert(decisions, first=5) if decisions else None
        won = iter(await consume_on_driver(driver, uses, alongside))
        inputs_pending = False
    else:
        won = iter(await consume_batch(conn, uses) if uses else [])
        inputs_pending = bool(decisions)
    jtis = {c.key for o in outcomes for c in o.conditions if isinstance(c, NotRevoked)}
    revoked = await revoked_among(conn, jtis) if jtis else set()
    failed = [_first_failed(o, won, revoked) for o in outcomes]
    events = [
        o.event if f is None else o.refused(f.error) for o, f in zip(outcomes, failed, strict=True)
    ]
    # one ledger insert for the outcomes and their decisions (and the decisions' inputs if they
    # did not ride with the upsert)
    await write_events(conn, events + [d.event for d in decisions])
    if inputs_pending:
        await write_inputs(conn, decisions)
    return failed


async def record_alone(conn: AsyncConnection, outcomes: Sequence[Outcome]) -> list[None] | None:
    """The writer's single-statement handler (PostgreSQL, a batch of token outcomes alone, on its
    autocommit connection): every ``jti`` claimed, the decisions' inputs, the ledger's pending
    rows of the outcomes' events and the decisions', and what the audit-sink observers index for
    them (the SSF derivation rows of a token exchange) in one statement, whose last step also
    checks that none of the tokens the batch rests on (:class:`NotRevoked`) is revoked; committed
    when it returns (every condition held). None, with nothing written: the batch runs in a
    transaction (:func:`record_batch`), because a ``jti`` was not fresh, a token it rests on is
    revoked, or an observer would write for these events other than as an insert of the
    statement."""
    uses: list[ReplayUse] = []
    unrevoked: list[str] = []
    for outcome in outcomes:
        for condition in outcome.conditions:
            if isinstance(condition, ConsumeJti):
                uses.append(condition.key)
            else:
                unrevoked.append(condition.key)
    decisions = [d for o in outcomes for d in o.decisions]
    events = [o.event for o in outcomes] + [d.event for d in decisions]
    alongside: list[tuple[str, Sequence[Any]]] = []
    first = 1  # claim_all numbers the claim's own parameters after these inserts
    if decisions:
        alongside.append(inputs := pg_inputs_insert(decisions, first=first))
        first += len(inputs[1])
    alongside.append(pending := pg_pending_insert([pending_row(e) for e in events], first=first))
    observed = await observer_inserts(events, first + len(pending[1]))
    if observed is None:
        return None
    alongside += observed
    try:
        driver = (await conn.get_raw_connection()).driver_connection
        await claim_all(driver, uses, alongside, unrevoked)
    except Replayed:
        return None
    _appended(len(events))
    return [None] * len(outcomes)


def _appended(count: int) -> None:
    """What :func:`~trustplane.audit.sink.write_events` does after its insert: count the entries
    and wake the sequencers. On PostgreSQL every append of a process runs on its event loop (only
    a SQLite file's writer has a thread of its own), so the count needs no lock here."""
    APPENDED[0] += count
    for wake in APPEND_WAKES:
        wake()


def _first_failed(outcome: Outcome, won: Iterator[bool], revoked: set[str]) -> Condition | None:
    first: Condition | None = None
    for condition in outcome.conditions:
        # a use's flag is drawn whatever failed before it, so the flags stay aligned with the uses
        holds = next(won) if isinstance(condition, ConsumeJti) else condition.key not in revoked
        if not holds and first is None:
            first = condition
    return first


class OutcomeRecorder:
    def __init__(self, writer: GroupCommitWriter) -> None:
        self._writer = writer
        writer.register(KIND, record_batch, statements_only=True, alone=record_alone)

    async def record(self, outcome: Outcome) -> Condition | None:
        """Durably record the outcome; return the condition that failed, if one did."""
        failed: Condition | None = await self._writer.submit(KIND, outcome)
        event = outcome.event
        if failed is not None:
            refused = AuditEventType.TOKEN_REFUSED.value
            reason = f"{failed.kind}: {failed.error.debug}"
            log.info(refused, client_id=event.client_id, jti=event.jti, reason=reason)
        elif event.decision == "deny":
            log.info(
                event.type.value, client_id=event.client_id, jti=event.jti, reason=event.reason
            )
        return failed
