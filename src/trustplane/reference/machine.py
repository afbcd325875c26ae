"""The one trade state machine of the reference services (see docs/settlement.md).

::

    created --execute--> executed --propose_allocation--> allocation_proposed
        --approve_allocation--> allocation_approved --submit_settlement--> settlement_submitted
        --settle--> settled | --fail--> failed | --cancel_settlement--> cancelled
    settlement_submitted --amend#n--> settlement_submitted (new instructions)

    created | executed | allocation_proposed | allocation_approved | settlement_submitted
        --exception--> exception --reconsent--> (the state it left) | --cancel--> cancelled

A transition is named once per trade and happens at most once: the store holds a unique constraint
on (trade_id, transition). The exception transitions are numbered (``exception#1``, ``reconsent#1``)
because an exception may be raised again after a re-consent.
"""

from __future__ import annotations

from dataclasses import dataclass

CREATED = "created"
EXECUTED = "executed"
ALLOCATION_PROPOSED = "allocation_proposed"
ALLOCATION_APPROVED = "allocation_approved"
SETTLEMENT_SUBMITTED = "settlement_submitted"
SETTLED = "settled"
FAILED = "failed"
EXCEPTION = "exception"
CANCELLED = "cancelled"

STATES = (
    CREATED,
    EXECUTED,
    ALLOCATION_PROPOSED,
    ALLOCATION_APPROVED,
    SETTLEMENT_SUBMITTED,
    SETTLED,
    FAILED,
    EXCEPTION,
    CANCELLED,
)
TERMINAL = frozenset({SETTLED, FAILED, CANCELLED})
#: The states a trade can leave by an exception (entitlement lost while the trade is in flight: at
#: settlement time, or signalled by the issuer at any step before a final state).
IN_FLIGHT = frozenset(
    {CREATED, EXECUTED, ALLOCATION_PROPOSED, ALLOCATION_APPROVED, SETTLEMENT_SUBMITTED}
)


@dataclass(frozen=True, slots=True)
class Transition:
    """``name`` is what the store's unique constraint holds; ``event`` the outbox event type."""

    name: str
    source: str
    target: str
    event: str


EXECUTE = Transition("execute", CREATED, EXECUTED, "trade.executed")
PROPOSE = Transition("propose_allocation", EXECUTED, ALLOCATION_PROPOSED, "allocation.proposed")
APPROVE = Transition(
    "approve_allocation", ALLOCATION_PROPOSED, ALLOCATION_APPROVED, "allocation.approved"
)
SUBMIT = Transition(
    "submit_settlement", ALLOCATION_APPROVED, SETTLEMENT_SUBMITTED, "settlement.submitted"
)
SETTLE = Transition("settle", SETTLEMENT_SUBMITTED, SETTLED, "settlement.settled")
FAIL = Transition("fail", SETTLEMENT_SUBMITTED, FAILED, "settlement.failed")
CANCEL_SETTLEMENT = Transition(
    "cancel_settlement", SETTLEMENT_SUBMITTED, CANCELLED, "settlement.cancelled"
)
#: The ordinary path, in order.
PATH = (EXECUTE, PROPOSE, APPROVE, SUBMIT, SETTLE)
BY_NAME = {t.name: t for t in (EXECUTE, PROPOSE, APPROVE, SUBMIT, SETTLE, FAIL)}


def amend_transition(number: int) -> Transition:
    """The ``number``-th amendment of a submitted settlement: the state stays, the instructions
    change; numbered so that each amendment happens once."""
    return Transition(
        f"amend#{number}", SETTLEMENT_SUBMITTED, SETTLEMENT_SUBMITTED, "settlement.amended"
    )


def exception_transition(source: str, number: int) -> Transition:
    """The ``number``-th exception of a trade, leaving ``source`` (one of :data:`IN_FLIGHT`)."""
    if source not in IN_FLIGHT:
        raise ValueError(f"a trade in state {source} cannot raise an exception")
    return Transition(f"exception#{number}", source, EXCEPTION, "settlement.exception")


def reconsent_transition(back_to: str, number: int) -> Transition:
    """Resolving exception ``number`` by re-consent: the trade returns to the state it left."""
    return Transition(f"reconsent#{number}", EXCEPTION, back_to, "exception.resolved")


CANCEL = Transition("cancel", EXCEPTION, CANCELLED, "exception.resolved")

#: The services that own transitions (reporting owns none: a read model that learns them all).
EXECUTION, ALLOCATION, SETTLEMENT, REPORTING = "execution", "allocation", "settlement", "reporting"
OWNERS = (EXECUTION, ALLOCATION, SETTLEMENT)
SERVICES = (EXECUTION, ALLOCATION, SETTLEMENT, REPORTING)
_OWNED = {
    "create": EXECUTION,
    EXECUTE.name: EXECUTION,
    PROPOSE.name: ALLOCATION,
    APPROVE.name: ALLOCATION,
}


def owner(transition: str) -> str:
    """The service whose store decides ``transition`` (its compare-and-set and unique constraint):
    execution ``create``, ``execute``; allocation ``propose_allocation``, ``approve_allocation``;
    settlement everything else (submit, amend#n, cancel_settlement, settle, fail, exception#n,
    reconsent#n, cancel, and the escalations)."""
    return _OWNED.get(transition, SETTLEMENT)
