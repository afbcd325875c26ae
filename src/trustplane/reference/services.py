"""The reference services, framework-free: execution (orders), allocation (propose / approve with
four eyes), settlement (submit / confirm, with the event-time entitlement check) and reporting,
plus the operators' exception handling. The HTTP layer (``http.py``) authenticates the caller
with the PEP SDK and hands each call a :class:`Caller`; every transition asks the PDP itself,
with the trade's current state in the context, right before the compare-and-set.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
import structlog

from trustplane.authzen.model import Decision, Entity
from trustplane.ids import uuid7
from trustplane.reference import machine
from trustplane.reference.entitlement import EntitlementUnavailable, MandateCheck, MandateStatus
from trustplane.reference.events import Envelope
from trustplane.reference.handoff import Dispatcher
from trustplane.reference.store import (
    Acting,
    DuplicateTransition,
    ExceptionRecord,
    Key,
    NotFound,
    OutOfOrder,
    StoredEvent,
    Trade,
    TradeStore,
    TransitionRecord,
)

log = structlog.get_logger("trustplane.reference")
Decide = Callable[[str, Entity, Mapping[str, Any]], Awaitable[Decision]]
SIDES = ("buy", "sell")
#: The PDP actions on a ``Trade`` (the default bundle's ``trade`` action group, docs/policy.md); the
#: routes' scopes are the OAuth side (docs/settlement.md). ``exception:<action>`` for operators.
CREATE, EXECUTE, PROPOSE = "trade:create", "trade:execute", "trade:propose_allocation"
APPROVE, SUBMIT = "trade:approve_allocation", "trade:submit_settlement"
CANCEL, CONFIRM = "trade:cancel_settlement", "trade:confirm_settlement"
#: An amount's or quantity's bounds: below 10**MAX_DIGITS, at most MAX_DECIMALS decimals.
MAX_DIGITS, MAX_DECIMALS = 30, 18
#: How often a signal's exception is retried on a trade that moved meanwhile (each retry re-reads it).
SIGNAL_ATTEMPTS = 5


@dataclass(frozen=True)
class Caller:
    """Who calls: ``subject`` (the token's ``sub``, else its client), the validated token's claims,
    the raw token (for the event-time introspection) and ``decide``, the PDP bound to this caller."""

    subject: str
    claims: Mapping[str, Any]
    token: str | None
    decide: Decide


@dataclass(frozen=True, slots=True)
class Signal:
    """A verified Security Event Token's event about a token or a mandate of issuer ``iss``
    (exactly one of ``token_jti``, ``mandate_id``): the issuer withdrew it (``signals.py``).
    ``reason``: ``token_revoked``, ``mandate_revoked`` or ``mandate_<status>``."""

    iss: str
    jti: str
    event_type: str
    reason: str
    detail: str
    token_jti: str | None = None
    mandate_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "iss": self.iss,
            "jti": self.jti,
            "event_type": self.event_type,
            "reason": self.reason,
            "token_jti": self.token_jti,
            "mandate_id": self.mandate_id,
        }


class Refused(Exception):
    """A refusal rendered as an RFC 9457 problem: ``status``, ``code`` (the problem type's last
    segment) and ``detail``; ``extra`` members go into the body."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra


class EntitlementLost(Refused):
    """The settlement was refused at event time and a ``settlement.exception`` raised."""

    def __init__(self, exception: ExceptionRecord, decision_id: str | None) -> None:
        super().__init__(
            403,
            "settlement-exception",
            f"entitlement lost since execution ({exception.reason}); exception "
            f"{exception.exception_id} raised, nothing was settled",
            exception=exception.as_dict(),
            decision_id=decision_id,
        )
        self.exception = exception


def trade_entity(trade: Trade) -> Entity:
    return Entity(
        "Trade",
        trade.trade_id,
        {
            "state": trade.state,
            "account": trade.account,
            "instrument": trade.instrument,
            "side": trade.side,
            "currency": trade.currency,
        },
    )


def _context(
    caller: Caller, trade: Trade, transition: str, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The PDP context of a trade action (the default bundle's ``TradeStepContext``): the trade's
    state, the transition, who acts, the token's ``txn`` and the trade's (from its order), plus the
    step's own facts. Absent facts are left out, never sent as null."""
    txn, trade_txn = caller.claims.get("txn"), trade.envelope.get("txn")
    context = {
        "trade_state": trade.state,
        "transition": transition,
        "actor": caller.subject,
        "txn": txn if isinstance(txn, str) else None,
        "trade_txn": trade_txn if isinstance(trade_txn, str) else None,
        **extra,
    }
    return {k: v for k, v in context.items() if v is not None}


def _amount(value: Any, what: str) -> str:
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise Refused(400, "invalid-request", f"{what} must be a decimal number") from None
    if not number.is_finite() or number <= 0 or len(str(value)) > 40:
        raise Refused(400, "invalid-request", f"{what} must be a positive decimal number")
    # bounded far inside the decimal context (Emax 999999), so sums of them cannot overflow
    exponent = number.as_tuple().exponent
    if number.adjusted() >= MAX_DIGITS or (isinstance(exponent, int) and -exponent > MAX_DECIMALS):
        raise Refused(
            400,
            "invalid-request",
            f"{what} must be below 1E{MAX_DIGITS}, with at most {MAX_DECIMALS} decimals",
        )
    return str(number)


def _text(order: Mapping[str, Any], name: str, limit: int) -> str:
    value = order.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise Refused(400, "invalid-request", f"{name} must be a string of 1 to {limit} characters")
    return value


@dataclass(frozen=True)
class ServiceStores:
    """Each service's store (docs/settlement.md, "Stores"): execution, allocation and settlement
    own their transitions; reporting learns them all. :meth:`shared`: one store for all four (the
    compact configuration: one compare-and-set, nothing to hand off)."""

    execution: TradeStore
    allocation: TradeStore
    settlement: TradeStore
    reporting: TradeStore

    @classmethod
    def shared(cls, store: TradeStore) -> ServiceStores:
        return cls(store, store, store, store)

    @property
    def split(self) -> bool:
        return self.execution is not self.settlement

    def by_service(self) -> dict[str, TradeStore]:
        return {
            machine.EXECUTION: self.execution,
            machine.ALLOCATION: self.allocation,
            machine.SETTLEMENT: self.settlement,
            machine.REPORTING: self.reporting,
        }

    def distinct(self) -> list[TradeStore]:
        found: list[TradeStore] = []
        for store in self.by_service().values():
            if all(store is not f for f in found):
                found.append(store)
        return found

    def jwks(self) -> dict[str, Any]:
        """The event keys of every owner (one JWKS; ``kid``: each key's thumbprint)."""
        keys: dict[str, Any] = {}
        for store in self.distinct():
            if store.signs:
                for key in store.signer.jwks()["keys"]:
                    keys[key["kid"]] = key
        return {"keys": list(keys.values())}


class TradeServices:
    """The four services, each on its own store (``stores``; a single :class:`TradeStore` is the
    compact configuration, all four on it). ``handoff``: the embedded dispatcher that hands an
    owner's events to the other stores before a call returns (None: someone else delivers them,
    e.g. JetStream consumers, or a test deciding when)."""

    def __init__(
        self,
        stores: TradeStore | ServiceStores,
        mandates: MandateCheck,
        *,
        handoff: Dispatcher | None = None,
    ) -> None:
        self.stores = stores if isinstance(stores, ServiceStores) else ServiceStores.shared(stores)
        self.mandates, self.handoff = mandates, handoff
        #: the settlement's store: exceptions, signals (and, compact, everything)
        self.store = self.stores.settlement
        #: called with the owner after each commit of its events (the serving process wakes its
        #: outbox publisher with it: serve.py)
        self.on_commit: list[Callable[[str], None]] = []

    async def _handed(self, service: str, event_id: str | None = None) -> None:
        """After ``service``'s commit: its events to the other stores, before the call returns
        (``event_id``: the call's own event, everything up to which must be handed off; the
        dispatcher takes it from memory when it can). The transition is committed whatever
        happens here: a downstream store that cannot be reached is logged and left to the
        dispatcher's sweep (the cursor did not move)."""
        for committed in self.on_commit:
            committed(service)
        if self.handoff is None:
            return
        try:
            await self.handoff.hand_off(service, event_id=event_id)
        except Exception as exc:  # the owner's commit stands; the sweep delivers later
            log.error("reference_handoff_deferred", service=service, error=str(exc))

    async def _authorize(
        self, caller: Caller, action: str, trade: Trade, transition: str, **context: Any
    ) -> Decision:
        decision = await caller.decide(
            action, trade_entity(trade), _context(caller, trade, transition, context)
        )
        if not decision.allowed:
            raise Refused(
                403,
                "denied",
                f"{action} denied by policy (decision {decision.decision_id})",
                decision_id=decision.decision_id,
            )
        return decision

    @staticmethod
    def _envelope(caller: Caller, decision: Decision) -> Envelope:
        return Envelope.from_claims(
            caller.claims,
            decision_ids=(decision.decision_id,),
            bundle_version=decision.bundle_version,
        )

    def _owner(self, transition: str) -> TradeStore:
        return self.stores.by_service()[machine.owner(transition)]

    async def _trade(self, trade_id: str, store: TradeStore | None = None) -> Trade:
        if "\x00" in trade_id:  # never stored (PostgreSQL's text cannot hold it): not asked
            raise Refused(404, "not-found", "no such trade (the id holds a NUL)")
        try:
            return await (store or self.store).trade(trade_id)
        except NotFound:
            raise Refused(404, "not-found", f"no trade {trade_id}") from None

    async def _in_state(self, trade_id: str, transition: machine.Transition) -> Trade:
        """The trade as its owner's store knows it, if it is in the transition's source state;
        else that store's own answer (done: 409 duplicate-transition, elsewhere, including
        ``exception`` learned from settlement: 409 out-of-order) before the PDP is asked.

        The trade as this process's store object last read or moved it, when that shows the
        source state (the owner's previous step here: execute after create, approve after
        propose, confirm after submit), saves the read: the transition's compare-and-set
        decides in any case, and a trade moved meanwhile by another process ends there with the
        same 409 (after a PDP decision the read would have spared)."""
        store = self._owner(transition.name)
        trade = store.last_known(trade_id)
        if trade is not None and trade.state == transition.source:
            return trade
        trade = await self._trade(trade_id, store)
        if trade.state != transition.source:
            raise await store.why(trade_id, transition)
        return trade

    async def _move(
        self,
        caller: Caller,
        action: str,
        trade_id: str,
        transition: machine.Transition,
        key: Key,
        **kwargs: Any,
    ) -> TransitionRecord:
        trade = await self._in_state(trade_id, transition)
        decision = await self._authorize(caller, action, trade, transition.name)
        record = await self._owner(transition.name).apply(
            trade_id,
            transition,
            caller.subject,
            self._envelope(caller, decision),
            key,
            acting=Acting.from_claims(caller.claims),
            **kwargs,
        )
        await self._handed(machine.owner(transition.name), record.event_id)
        return record

    # ----------------------------------------------------------------- execution

    async def create_order(self, caller: Caller, order: Mapping[str, Any], key: Key) -> Trade:
        side = order.get("side")
        if side not in SIDES:
            raise Refused(400, "invalid-request", "side must be buy or sell")
        currency = _text(order, "currency", 3)
        if len(currency) != 3 or not currency.isalpha() or not currency.isupper():
            raise Refused(400, "invalid-request", "currency must be an ISO 4217 code")
        fields = {
            "account": _text(order, "account", 64),
            "instrument": _text(order, "instrument", 64),
            "side": str(side),
            "quantity": _amount(order.get("quantity"), "quantity"),
            "amount": _amount(order.get("amount"), "amount"),
            "currency": currency,
        }
        trade_id = uuid7()  # time-ordered: the stores' unique indexes grow at their right edge
        draft = Trade(
            trade_id, "none", fields["account"], fields["instrument"], fields["side"],
            fields["quantity"], fields["amount"], currency, None, {}, None, None, None, 0, 0,
        )  # fmt: skip
        decision = await self._authorize(caller, CREATE, draft, "create", amount=fields["amount"])
        envelope = self._envelope(caller, decision)
        trade, record = await self.stores.execution.create(
            trade_id, fields, caller.subject, envelope, key, Acting.from_claims(caller.claims)
        )
        await self._handed(machine.EXECUTION, record.event_id)
        return trade

    async def execute(self, caller: Caller, trade_id: str, key: Key) -> TransitionRecord:
        return await self._move(caller, EXECUTE, trade_id, machine.EXECUTE, key)

    # ----------------------------------------------------------------- allocation

    async def propose_allocation(
        self, caller: Caller, trade_id: str, allocations: Any, key: Key
    ) -> TransitionRecord:
        store = self.stores.allocation
        trade = await self._trade(trade_id, store)
        if not isinstance(allocations, list) or not 0 < len(allocations) <= 100:
            raise Refused(400, "invalid-request", "allocations must be a list of 1 to 100 items")
        total = Decimal(0)
        for item in allocations:
            if not isinstance(item, dict) or set(item) != {"account", "quantity"}:
                raise Refused(400, "invalid-request", "each allocation is {account, quantity}")
            _text(item, "account", 64)
            total += Decimal(_amount(item["quantity"], "allocation quantity"))
        if total != Decimal(trade.quantity):
            raise Refused(400, "invalid-request", "the allocations must add up to the quantity")
        if trade.state != machine.PROPOSE.source:
            raise await store.why(trade_id, machine.PROPOSE)
        decision = await self._authorize(caller, PROPOSE, trade, machine.PROPOSE.name)
        record = await store.apply(
            trade_id,
            machine.PROPOSE,
            caller.subject,
            self._envelope(caller, decision),
            key,
            data={"allocations": allocations},
            updates={"allocation": allocations, "proposer": caller.subject},
            acting=Acting.from_claims(caller.claims),
        )
        await self._handed(machine.ALLOCATION, record.event_id)
        return record

    async def approve_allocation(self, caller: Caller, trade_id: str, key: Key) -> TransitionRecord:
        trade = await self._in_state(trade_id, machine.APPROVE)
        if trade.proposer is not None and trade.proposer == caller.subject:
            raise Refused(
                403,
                "four-eyes",
                "the allocation must be approved by someone other than its proposer",
            )
        decision = await self._authorize(
            caller, APPROVE, trade, machine.APPROVE.name, proposer=trade.proposer
        )
        record = await self.stores.allocation.apply(
            trade_id,
            machine.APPROVE,
            caller.subject,
            self._envelope(caller, decision),
            key,
            acting=Acting.from_claims(caller.claims),
        )
        await self._handed(machine.ALLOCATION, record.event_id)
        return record

    # ----------------------------------------------------------------- settlement

    async def submit_settlement(
        self, caller: Caller, trade_id: str, instructions: Any, key: Key
    ) -> TransitionRecord:
        """Submit the settlement of an approved allocation, after the event-time entitlement
        check (:meth:`_entitled_step`)."""
        trade = await self._trade(trade_id)
        return await self._entitled_step(
            caller, trade, machine.SUBMIT, "allocation.approved", instructions, key
        )

    async def amend_settlement(
        self, caller: Caller, trade_id: str, instructions: Any, key: Key
    ) -> TransitionRecord:
        """Replace the instructions of a submitted settlement (transition ``amend#n``, event
        ``settlement.amended``); the mandate is re-checked as for the submission."""
        trade = await self._trade(trade_id)
        history = await self.store.history(trade_id)
        number = 1 + sum(r.transition.startswith("amend#") for r in history)
        return await self._entitled_step(
            caller, trade, machine.amend_transition(number), "settlement.submitted",
            instructions, key,
        )  # fmt: skip

    async def cancel_settlement(self, caller: Caller, trade_id: str, key: Key) -> TransitionRecord:
        """Withdraw a submitted settlement: the trade ends ``cancelled``."""
        return await self._move(caller, CANCEL, trade_id, machine.CANCEL_SETTLEMENT, key)

    async def _entitled_step(
        self,
        caller: Caller,
        trade: Trade,
        transition: machine.Transition,
        acting_on: str,
        instructions: Any,
        key: Key,
    ) -> TransitionRecord:
        """Event-time entitlement: the mandate's status now (introspection at the issuer) and a PDP
        decision with the event acted on as context. Entitlement lost: the trade goes to
        ``exception`` with ``settlement.exception``, and the call is refused."""
        if not isinstance(instructions, dict) or len(orjson.dumps(instructions)) > 4096:
            raise Refused(400, "invalid-request", "instructions must be an object (max 4 KiB)")
        if trade.state != transition.source:
            # the compare-and-set's own answer (done, out of order), before any introspection
            raise await self.store.why(trade.trade_id, transition)
        try:
            status = await self.mandates.check(caller.token, caller.claims, trade.envelope)
        except EntitlementUnavailable as exc:
            log.error("reference_entitlement_unavailable", trade_id=trade.trade_id, error=str(exc))
            raise Refused(
                503, "unavailable", "the mandate's issuer cannot be asked; retry"
            ) from None
        mandate = trade.envelope.get("mandate")
        mandate_id = mandate.get("id") if isinstance(mandate, dict) else None
        decision = await caller.decide(
            SUBMIT,
            trade_entity(trade),
            _context(
                caller,
                trade,
                transition.name,
                {
                    "mandate_active": status.usable,
                    "mandate_id": mandate_id,
                    "event_type": acting_on,
                },
            ),
        )
        if not status.usable:
            raise await self._exception(caller, trade, status, decision)
        if not decision.allowed:
            raise Refused(
                403,
                "denied",
                f"{SUBMIT} denied by policy (decision {decision.decision_id})",
                decision_id=decision.decision_id,
            )
        record = await self.store.apply(
            trade.trade_id,
            transition,
            caller.subject,
            self._envelope(caller, decision),
            key,
            data={"instructions": instructions, "mandate": status.as_dict()},
            updates={"settlement": instructions},
            acting=Acting.from_claims(caller.claims),
        )
        await self._handed(machine.SETTLEMENT, record.event_id)
        return record

    async def _exception(
        self, caller: Caller, trade: Trade, status: MandateStatus, decision: Decision
    ) -> EntitlementLost:
        number = trade.exceptions + 1
        record = ExceptionRecord(
            f"{trade.trade_id}.{number}",
            trade.trade_id,
            number,
            trade.state,
            status.reason,
            status.detail,
            "open",
            None,
            0.0,
        )
        transition = machine.exception_transition(trade.state, number)
        await self.store.apply(
            trade.trade_id,
            transition,
            caller.subject,
            self._envelope(caller, decision),
            None,
            data={"mandate": status.as_dict(), "decision_allowed": decision.allowed},
            exception=record,
            acting=Acting.from_claims(caller.claims),
        )
        await self._handed(machine.SETTLEMENT)
        log.warning(
            "reference_settlement_exception",
            trade_id=trade.trade_id,
            reason=status.reason,
            decision_id=decision.decision_id,
        )
        return EntitlementLost(
            await self.store.exception(record.exception_id), decision.decision_id
        )

    async def confirm_settlement(
        self, caller: Caller, trade_id: str, outcome: Any, key: Key
    ) -> TransitionRecord:
        if outcome not in ("settled", "failed"):
            raise Refused(400, "invalid-request", "outcome must be settled or failed")
        transition = machine.SETTLE if outcome == "settled" else machine.FAIL
        # settled and failed exclude each other: whichever came first, the other finds the trade
        # out of its source state (or, if it is the same, already done).
        return await self._move(caller, CONFIRM, trade_id, transition, key)

    # ----------------------------------------------------------------- reporting

    async def report(self, trade_id: str) -> dict[str, Any]:
        """The trade and its history as the reporting store learned them."""
        trade = await self._trade(trade_id, self.stores.reporting)
        history = await self.stores.reporting.history(trade_id)
        return {**trade.as_dict(), "transitions": [r.as_dict() for r in history]}

    async def events(self, after: int, wait: float) -> list[StoredEvent]:
        """``GET /events``: compact, the outbox; split, the reporting store's feed (every owner's
        events, verified and learned, in the order reporting received them; its own cursor)."""
        store, feed = (self.stores.reporting, True) if self.stores.split else (self.store, False)
        read = store.feed_after if feed else store.events_after
        if after > 0 and not await read(after - 1, 1):  # no event at or past the cursor
            raise Refused(
                400, "invalid-request", f"the cursor {after} is beyond the last event: not ours"
            )
        return await store.wait_events(after, wait, feed=feed)

    # ----------------------------------------------------------------- exceptions

    async def list_exceptions(self, status: str | None = None) -> list[ExceptionRecord]:
        return await self.store.list_exceptions(status)

    async def resolve_exception(
        self, operator: Caller, exception_id: str, action: str, note: str = ""
    ) -> ExceptionRecord:
        """``reconsent``: the trade returns to the state it left (the next step re-checks the
        mandate); ``cancel``: the trade ends ``cancelled``; ``escalate``: stays open, flagged.
        Each step is authorized by the PDP and written as a signed event."""
        if action not in ("reconsent", "cancel", "escalate"):
            raise Refused(400, "invalid-request", "action must be reconsent, cancel or escalate")
        try:
            if "\x00" in exception_id:  # never stored, as for a trade id
                raise NotFound(exception_id)
            record = await self.store.exception(exception_id)
        except NotFound:
            raise Refused(404, "not-found", f"no exception {exception_id}") from None
        if action != "escalate" and record.status == "resolved":
            raise Refused(409, "already-resolved", f"exception {exception_id} is resolved")
        trade = await self._trade(record.trade_id)
        decision = await self._authorize(
            operator, f"exception:{action}", trade, action, exception_id=exception_id
        )
        envelope = self._envelope(operator, decision)
        if action == "escalate":
            escalated = await self.store.escalate(exception_id, operator.subject, envelope, note)
            await self._handed(machine.SETTLEMENT)
            return escalated
        transition = (
            machine.reconsent_transition(record.from_state, record.number)
            if action == "reconsent"
            else machine.CANCEL
        )
        await self.store.apply(
            record.trade_id,
            transition,
            operator.subject,
            envelope,
            None,
            data={
                "exception_id": exception_id,
                "resolution": action,
                "note": note,
                "from_state": record.from_state,  # where a cancel leaves the path (concerns)
            },
            resolve=(exception_id, action),
            acting=Acting.from_claims(operator.claims),
        )
        await self._handed(machine.SETTLEMENT)
        return await self.store.exception(exception_id)

    # ----------------------------------------------------------------- the issuer's signals

    async def raise_on_signal(self, signal: Signal) -> list[ExceptionRecord]:
        """The issuer withdrew a token or a mandate (a verified SET, ``signals.py``): every trade in
        flight that rests on it (a transition made with that token, or with a token of that
        mandate) moves to ``exception`` now (``exception#n``, event ``settlement.exception`` with
        the SET as evidence, an exception row opened), before anyone acts on it again. At most one
        exception per trade and SET however often it is delivered; a trade already in exception
        or final is left alone. The PDP is not asked: taking entitlement away is not a permission.
        """
        found = await self.store.resting_on(
            signal.iss, token_jti=signal.token_jti, mandate_id=signal.mandate_id
        )
        raised: list[ExceptionRecord] = []
        for trade in found:
            record = await self._signal_exception(trade, signal)
            if record is not None:
                raised.append(record)
        return raised

    async def _signal_exception(self, trade: Trade, signal: Signal) -> ExceptionRecord | None:
        for _ in range(SIGNAL_ATTEMPTS):
            if trade.state not in machine.IN_FLIGHT or await self.store.signalled(
                signal.iss, signal.jti, trade.trade_id
            ):
                return None
            number = trade.exceptions + 1
            record = ExceptionRecord(
                f"{trade.trade_id}.{number}", trade.trade_id, number, trade.state,
                signal.reason, signal.detail, "open", None, 0.0,
            )  # fmt: skip
            mandate = trade.envelope.get("mandate")
            envelope = Envelope(
                txn=trade.txn,
                sub=None,
                client_id=None,
                mandate=dict(mandate) if isinstance(mandate, dict) else None,
            )
            try:
                await self.store.apply(
                    trade.trade_id,
                    machine.exception_transition(trade.state, number),
                    f"ssf:{signal.iss}"[:256],
                    envelope,
                    None,
                    data={"signal": signal.as_dict()},
                    exception=record,
                    signal=(signal.iss, signal.jti),
                )
            except (DuplicateTransition, OutOfOrder):
                trade = await self.store.trade(trade.trade_id)  # it moved meanwhile: look again
                continue
            await self._handed(machine.SETTLEMENT)
            log.warning(
                "reference_signal_exception",
                trade_id=trade.trade_id,
                reason=signal.reason,
                set_jti=signal.jti[:64],
            )
            return await self.store.exception(record.exception_id)
        return None
