"""The decision point's vocabulary: entities, requests, decisions, and the ``DecisionPoint`` protocol.

Framework-free and engine-free: the HTTP PDP (AuthZEN), the PEP SDK and the token endpoint code
against ``DecisionPoint``; the Cedar implementation lives in ``policy.engine``.

Entities map onto Cedar's entity model:

- ``type``/``id`` form the entity uid (``Client::"c-123"``); ``type`` is an entity type of the bundle's
  schema (``Client``, ``User``, ``LegalEntity``, ``Desk``, ``Account``, ``Instrument``, ``Order``,
  ``Settlement``, ``Report``, ``Scope``).
- ``attributes`` are this request's attribute values for the entity. A value may itself be an
  ``Entity`` (a reference, e.g. a client's ``legal_entity``); it is sent as a uid, and the referenced
  entity's own attributes are not included unless it also appears in ``parents`` or as the subject or
  resource.
- ``parents`` is Cedar membership (``principal in LegalEntity::"LEI..."``): each parent is an ``Entity``
  whose attributes, if any, are included in the request's entity set too.

Actions are the business verbs of the scope vocabulary (``order:create``, ``settlement:submit``, ...)
plus ``token:obtain``; the engine turns ``"order:create"`` into ``Action::"order:create"``.

A ``Decision`` never raises: every failure (engine error, missing or mistyped attribute, no decision,
unreachable remote PDP) is a deny whose ``reason_ids`` names the failure (see ``FailReason``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Entity:
    """A Cedar entity reference plus the attributes and parents this request supplies for it."""

    type: str
    id: str
    attributes: Mapping[str, Any] = field(default_factory=dict)
    parents: tuple[Entity, ...] = ()

    @property
    def uid(self) -> str:
        """The Cedar surface form, ``Type::"id"`` (for logs and reports, not for the engine)."""
        return f'{self.type}::"{self.id}"'


@dataclass(frozen=True, slots=True)
class DecisionRequest:
    """One question: may ``subject`` perform ``action`` on ``resource`` in ``context``?"""

    subject: Entity
    action: str
    resource: Entity
    context: Mapping[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    #: The business transaction the question belongs to (a token's ``txn``): the decision's ledger
    #: entry carries it, so the transaction's chain of authority lists the decision.
    transaction_id: str | None = None


class FailReason(StrEnum):
    """Reason ids of fail-closed denies (they never collide with policy ``@id`` values, which use dots)."""

    ENGINE_ERROR = "engine_error"
    MISSING_ATTRIBUTE = "missing_attribute"
    INVALID_REQUEST = "invalid_request"
    NO_DECISION = "no_decision"
    NO_ACTIVE_BUNDLE = "no_active_bundle"
    PDP_UNREACHABLE = "pdp_unreachable"
    DEFAULT_DENY = "default_deny"
    AUDIT_UNAVAILABLE = "audit_unavailable"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer. ``reason_ids`` holds the ``@id`` of the determining policies: the permits that
    allowed, or the forbids that denied; a deny that no policy matched carries ``default_deny``;
    a fail-closed deny carries a ``FailReason`` value."""

    allowed: bool
    reason_ids: tuple[str, ...]
    bundle_version: str
    decision_id: str


class DecisionPoint(Protocol):
    """Anything that decides: the in-process Cedar engine, or a remote AuthZEN PDP client.

    Implementations never raise for a decision: errors become fail-closed denies. Every decision,
    allow and deny, is recorded by the implementation that made it.
    """

    async def decide(
        self,
        subject: Entity,
        action: str,
        resource: Entity,
        context: Mapping[str, Any],
        *,
        correlation_id: str | None = None,
        transaction_id: str | None = None,
    ) -> Decision: ...

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        """One decision per request, in order (the AuthZEN batch evaluation)."""
        ...
