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


#: The path's states in order: where a trade stands, exceptions aside (an exception keeps the state
#: it left, and a re-consent returns to it).
_POSITION = {
    state: i
    for i, state in enumerate(
        (CREATED, EXECUTED, ALLOCATION_PROPOSED, ALLOCATION_APPROVED, SETTLEMENT_SUBMITTED)
    )
}
#: The last path state each upstream owner acts from (execution: ``execute``; allocation:
#: ``approve_allocation``). Settlement and reporting act on, or show, everything.
_ACTS_UNTIL = {EXECUTION: CREATED, ALLOCATION: ALLOCATION_PROPOSED}


def concerns(
    service: str | None,
    transition: str,
    source: str | None,
    target: str | None,
    left: str | None = None,
) -> bool:
    """Whether ``service``'s store must learn another owner's ``transition`` (``source`` ->
    ``target``; ``left``: for a ``cancel`` or an escalation, the state the exception left, when
    the event says).

    A store learns what its own decisions read: execution decides only from ``created``,
    allocation only up to ``allocation_proposed``. Where a trade stands on the path never goes
    back (an exception keeps the state it left, a re-consent returns to it, the rest moves
    forward), and leaving an owner's last state takes the owner's own transition (``execute``,
    ``approve_allocation``), recorded in its store for ever. So a transition made beyond that
    state can change none of the owner's answers (its steps are done: 409
    ``duplicate-transition``), and its store need not learn it: the events it learns are a prefix
    of the trade's history, in order. Settlement and reporting learn everything; an event whose
    position is unknown (an older event without ``left``) is learned."""
    until = _ACTS_UNTIL.get(service or "")
    if until is None:
        return True
    at = _at(transition, source, target, left)
    return at is None or _POSITION[at] <= _POSITION[until]


def _at(transition: str, source: str | None, target: str | None, left: str | None) -> str | None:
    """Where on the path the trade stood when ``transition`` happened (None: unknown)."""
    if transition.startswith("reconsent#"):
        at = target
    elif transition == CANCEL.name or transition.startswith("escalate#"):
        at = left
    else:  # the path's steps, the amendments, the exceptions (from the state they leave)
        at = source
    return at if at in _POSITION else None
