"""The mandate as the rest of the server sees it: one immutable version of the terms plus the
mandate's lifecycle status resolved against the clock at the moment it was read.

Lifecycle::

    proposed --accept--> active --suspend--> suspended --resume--> active
        |                  |  \\                  |
        +------revoke------+---+--amend (new version, old one superseded)
                                         revoke --> revoked (final)
    expired: not stored; any version whose ``effective_until`` has passed reads as expired.

Revocation path: the grantor (the natural person who accepted, or any officer of the grantor's legal
entity acting through an administrator) revokes through the management API
(``POST {issuer}/mandates/{id}/revoke``, scope ``mandate:administer`` on audience
``{issuer}/mandates``) or ``trustplane mandates revoke``. Revocation is final; suspension is not.
The revocation path recorded on each mandate says this in words so that an auditor reading one
record knows how it could have been ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

DEFAULT_REVOCATION_PATH = (
    "grantor or grantor's administrator: trustplane mandates revoke / "
    "POST {issuer}/mandates/{id}/revoke (scope mandate:administer); final, takes effect at once"
)


class LegalBasis(StrEnum):
    """Why the grantee may act: the instrument the document reference points to."""

    MANDATE = "mandate"
    STANDING_INSTRUCTION = "standing_instruction"
    ONBOARDING_AGREEMENT = "onboarding_agreement"
    TRI_PARTY_RULE = "tri_party_rule"


class MandateStatus(StrEnum):
    """Stored statuses are proposed/active/suspended/revoked; ``expired`` and ``superseded`` are
    derived when a version is read (clock past ``effective_until``; a newer version exists)."""

    PROPOSED = "proposed"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"


class MandateAction(StrEnum):
    """One entry of a mandate's change history (and the audit event it produced)."""

    CREATED = "created"
    ACCEPTED = "accepted"
    AMENDED = "amended"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Mandate:
    """One version of a mandate. Times are epoch seconds; ``effective_until`` None means open-ended.

    ``status`` is resolved against the clock when read (see :func:`resolve_status`);
    ``recorded_status`` is what the store holds for the mandate as a whole.
    """

    id: str
    version: int
    grantor_lei: str
    grantor_person: str | None
    grantee_client_id: str
    grantee_lei: str
    scopes: tuple[str, ...]
    authorization_details: tuple[dict[str, Any], ...]
    effective_from: int
    effective_until: int | None
    legal_basis: LegalBasis
    document_ref: str | None
    status: MandateStatus
    accepted_by: str | None
    accepted_at: int | None
    created_by: str
    created_at: int
    revocation_path: str = DEFAULT_REVOCATION_PATH
    recorded_status: MandateStatus = MandateStatus.ACTIVE
    current_version: int = 1
    status_reason: str | None = None

    @property
    def ref(self) -> dict[str, Any]:
        """The ``mandate`` claim of a token issued under this version."""
        return {"id": self.id, "version": self.version}

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "current_version": self.current_version,
            "status": self.status.value,
            "recorded_status": self.recorded_status.value,
            "status_reason": self.status_reason,
            "grantor": {"lei": self.grantor_lei, "person": self.grantor_person},
            "grantee": {"client_id": self.grantee_client_id, "lei": self.grantee_lei},
            "scopes": list(self.scopes),
            "authorization_details": list(self.authorization_details),
            "effective_from": self.effective_from,
            "effective_until": self.effective_until,
            "legal_basis": self.legal_basis.value,
            "document_ref": self.document_ref,
            "accepted_by": self.accepted_by,
            "accepted_at": self.accepted_at,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "revocation_path": self.revocation_path,
        }


@dataclass(frozen=True, slots=True)
class MandateTerms:
    """What a new mandate or an amendment states (everything but identity and lifecycle)."""

    grantor_lei: str
    grantee_client_id: str
    scopes: tuple[str, ...]
    authorization_details: tuple[dict[str, Any], ...] = ()
    effective_from: int | None = None
    effective_until: int | None = None
    legal_basis: LegalBasis = LegalBasis.MANDATE
    document_ref: str | None = None
    grantor_person: str | None = None
    revocation_path: str = DEFAULT_REVOCATION_PATH


@dataclass(frozen=True, slots=True)
class MandateChange:
    """One row of a mandate's history: which version, what happened, who did it, why."""

    mandate_id: str
    version: int
    action: MandateAction
    status: MandateStatus
    actor: str
    reason: str | None
    at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mandate_id": self.mandate_id,
            "version": self.version,
            "action": self.action.value,
            "status": self.status.value,
            "actor": self.actor,
            "reason": self.reason,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class MandateFilter:
    """``list`` filters; None means "any". ``expiring_within`` is seconds from now."""

    grantor_lei: str | None = None
    grantee_client_id: str | None = None
    status: MandateStatus | None = None
    expiring_within: int | None = None
    limit: int = 200


def resolve_status(
    recorded: MandateStatus,
    version: int,
    current_version: int,
    effective_until: int | None,
    now: int,
) -> MandateStatus:
    """The status of one version at ``now``: revoked beats everything, then superseded, then
    expired (clock), then the recorded proposed/active/suspended."""
    if recorded is MandateStatus.REVOKED:
        return recorded
    if version < current_version:
        return MandateStatus.SUPERSEDED
    if effective_until is not None and now >= effective_until:
        return MandateStatus.EXPIRED
    return recorded
