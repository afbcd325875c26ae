"""The audit event envelope, kept stable so that the tamper-evident ledger can adopt it unchanged.

Event types are named ``component:subject:action``. Identifiers only: no names, e-mails or free text
in the envelope (personal payload goes to ``payload``, which the ledger keeps outside its hashed leaves,
committed to by a salted hash, so that it can be purged). See ``audit/canonical.py`` for the entry.

A top-level module, below every component: keys, clients and users record events without depending
on the ledger (``trustplane.audit``), which sits above the bearer guard.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from trustplane.ids import uuid7_hex

#: Set by ``trustplane.tracing`` when tracing is on: the current trace id (None outside a request).
#: An event made without a correlation id of its own takes it, where it is made: in the request.
CORRELATION: Callable[[], str | None] | None = None


class AuditEventType(StrEnum):
    TOKEN_ISSUED = "oauth:token:issued"
    TOKEN_REFUSED = "oauth:token:refused"
    TOKEN_REVOKED = "oauth:token:revoked"
    CLIENT_REGISTERED = "oauth:client:registered"
    CLIENT_UPDATED = "oauth:client:updated"
    CLIENT_DISABLED = "oauth:client:disabled"
    CLIENT_DELETED = "oauth:client:deleted"
    CLIENT_REGISTRATION_REFUSED = "oauth:client:refused"
    REGISTRATION_TOKEN_CREATED = "oauth:registration_token:created"
    REGISTRATION_TOKEN_REVOKED = "oauth:registration_token:revoked"
    KEY_CREATED = "keys:key:created"
    KEY_ACTIVATED = "keys:key:activated"
    KEY_RETIRED = "keys:key:retired"
    KEY_REMOVED = "keys:key:removed"
    PARTNER_ADDED = "federation:partner:added"
    PARTNER_UPDATED = "federation:partner:updated"
    PARTNER_DISABLED = "federation:partner:disabled"
    MANDATE_CREATED = "mandates:mandate:created"
    MANDATE_ACCEPTED = "mandates:mandate:accepted"
    MANDATE_AMENDED = "mandates:mandate:amended"
    MANDATE_SUSPENDED = "mandates:mandate:suspended"
    MANDATE_RESUMED = "mandates:mandate:resumed"
    MANDATE_REVOKED = "mandates:mandate:revoked"
    MANDATE_EXPIRED = "mandates:mandate:expired"
    # authorization endpoint, login, codes, refresh tokens (issue 5)
    CONSENT_GRANTED = "oauth:consent:granted"
    CONSENT_DENIED = "oauth:consent:denied"
    AUTHORIZATION_REFUSED = "oauth:authorization:refused"
    CODE_ISSUED = "oauth:code:issued"
    CODE_REUSED = "oauth:code:reused"
    REFRESH_FAMILY_REVOKED = "oauth:refresh_family:revoked"
    USER_CREATED = "users:user:created"
    USER_UPDATED = "users:user:updated"
    USER_LOGIN_SUCCEEDED = "users:login:succeeded"
    USER_LOGIN_FAILED = "users:login:failed"
    USER_LOCKED = "users:user:locked"
    AUDIT_PAYLOADS_PURGED = "audit:payload:purged"
    AUDIT_LOG_KEY_CREATED = "audit:log_key:created"
    AUDIT_LEDGER_QUERIED = "audit:ledger:queried"
    #: the placeholder leaf of a pending entry the sequencer could not integrate (docs/ledger.md)
    AUDIT_ENTRY_QUARANTINED = "audit:entry:quarantined"
    # policy decision point
    POLICY_DECISION_ALLOWED = "policy:decision:allowed"
    POLICY_DECISION_DENIED = "policy:decision:denied"
    POLICY_BUNDLE_PUBLISHED = "policy:bundle:published"
    POLICY_BUNDLE_ACTIVATED = "policy:bundle:activated"
    POLICY_BUNDLE_ROLLED_BACK = "policy:bundle:rolled_back"
    # events ingested from the reference settlement services (POST /audit/events, docs/ledger.md):
    # ``trade:`` + the signed event's ``type`` with ``.`` as ``:``
    AUDIT_EVENTS_REFUSED = "audit:event:refused"
    TRADE_ORDER_CREATED = "trade:order:created"
    TRADE_EXECUTED = "trade:trade:executed"
    TRADE_ALLOCATION_PROPOSED = "trade:allocation:proposed"
    TRADE_ALLOCATION_APPROVED = "trade:allocation:approved"
    TRADE_SETTLEMENT_SUBMITTED = "trade:settlement:submitted"
    TRADE_SETTLEMENT_AMENDED = "trade:settlement:amended"
    TRADE_SETTLEMENT_CANCELLED = "trade:settlement:cancelled"
    TRADE_SETTLEMENT_SETTLED = "trade:settlement:settled"
    TRADE_SETTLEMENT_FAILED = "trade:settlement:failed"
    TRADE_SETTLEMENT_EXCEPTION = "trade:settlement:exception"
    TRADE_EXCEPTION_ESCALATED = "trade:exception:escalated"
    TRADE_EXCEPTION_RESOLVED = "trade:exception:resolved"
    # operator console (docs/console.md): every sign-in, sign-out and action names the person
    CONSOLE_SIGNED_IN = "console:session:started"
    CONSOLE_SIGNED_OUT = "console:session:ended"
    CONSOLE_ACTION = "console:action:performed"
    CONSOLE_ACTION_REFUSED = "console:action:refused"
    # surveillance signals over the ledger (docs/surveillance.md): ``reason`` names the signal
    SURVEILLANCE_ALERT = "surveillance:alert:raised"


def new_event_id() -> str:
    """A new event (and policy decision) id: a UUIDv7 as 32 lowercase hex digits, the form ids
    always had here, in time order (:mod:`trustplane.ids`). ``policy_decisions`` is keyed by it."""
    return uuid7_hex()


@dataclass(slots=True, frozen=True)
class AuditEvent:
    """One audit record. ``time`` is epoch milliseconds; lists are kept in a stable order."""

    type: AuditEventType
    issuer: str
    subject: str | None = None
    client_id: str | None = None
    actor_chain: tuple[str, ...] = ()
    partner: str | None = None
    audience: str | None = None
    scopes: tuple[str, ...] = ()
    authorization_details_digest: str | None = None
    mandate_id: str | None = None
    mandate_version: int | None = None
    transaction_id: str | None = None
    correlation_id: str | None = None
    jti: str | None = None
    decision: str | None = None
    reason: str | None = None
    reason_ids: tuple[str, ...] = ()
    policy_bundle_version: str | None = None
    service: str = "trustplane.oauth"
    region: str | None = None
    #: Why the access happened (e.g. "settlement", "regulatory-report"): an identifier, not free text.
    purpose: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    time: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    event_id: str = field(default_factory=lambda: new_event_id())

    def __post_init__(self) -> None:
        if self.correlation_id is None and CORRELATION is not None:
            object.__setattr__(self, "correlation_id", CORRELATION())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``dataclasses.asdict`` deep-copies and is slow on the hot path)."""
        out = {name: getattr(self, name) for name in _FIELDS}
        out["type"] = self.type.value
        out["actor_chain"] = list(self.actor_chain)
        out["scopes"] = list(self.scopes)
        out["reason_ids"] = list(self.reason_ids)
        return out


_FIELDS = tuple(f.name for f in fields(AuditEvent))
