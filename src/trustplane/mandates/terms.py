"""Mandate versions: checking and building their terms (creation and amendment share them), reading
them back as :class:`Mandate`, and the audit record of each change."""

from __future__ import annotations

from typing import Any

from stdnum import lei as stdnum_lei

from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.clients.model import Client
from trustplane.clients.service import ClientRegistry
from trustplane.mandates.errors import MandateInvalidError
from trustplane.mandates.model import (
    DEFAULT_REVOCATION_PATH,
    LegalBasis,
    Mandate,
    MandateAction,
    MandateChange,
    MandateTerms,
    resolve_status,
)
from trustplane.mandates.store import Head, Version
from trustplane.rar.registry import AuthorizationDetailsRegistry

_AUDIT = {
    MandateAction.CREATED: AuditEventType.MANDATE_CREATED,
    MandateAction.ACCEPTED: AuditEventType.MANDATE_ACCEPTED,
    MandateAction.AMENDED: AuditEventType.MANDATE_AMENDED,
    MandateAction.SUSPENDED: AuditEventType.MANDATE_SUSPENDED,
    MandateAction.RESUMED: AuditEventType.MANDATE_RESUMED,
    MandateAction.REVOKED: AuditEventType.MANDATE_REVOKED,
    MandateAction.EXPIRED: AuditEventType.MANDATE_EXPIRED,
}


def new_version(
    registry: AuthorizationDetailsRegistry,
    clients: ClientRegistry,
    mandate_id: str,
    number: int,
    terms: MandateTerms,
    actor: str,
    accepted_by: str | None,
    now: int,
) -> Version:
    client = check_terms(clients, terms, now)
    details = (
        registry.validate(list(terms.authorization_details), client)
        if terms.authorization_details
        else ()
    )
    return Version(
        mandate_id=mandate_id,
        version=number,
        grantor_lei=terms.grantor_lei,
        grantor_person=terms.grantor_person,
        grantee_client_id=client.client_id,
        grantee_lei=client.lei,
        scopes=tuple(sorted(set(terms.scopes))),
        authorization_details=details,
        details_digest=registry.digest(details) or "",
        effective_from=terms.effective_from if terms.effective_from is not None else now,
        effective_until=terms.effective_until,
        legal_basis=terms.legal_basis,
        document_ref=terms.document_ref,
        revocation_path=terms.revocation_path or DEFAULT_REVOCATION_PATH,
        accepted_by=accepted_by,
        accepted_at=now if accepted_by else None,
        created_by=actor,
        created_at=now,
    )


#: 9999-12-31T23:59:59Z: later dates are typos, and would not fit every database's integer.
MAX_TIME = 253_402_300_799
TEXT_LIMIT = 500


def check_text(**fields: str | None) -> None:
    """Free-text fields (people, references, reasons, actors): one printable line, bounded.
    Control characters would corrupt logs and exports, and PostgreSQL refuses NUL outright."""
    for name, value in fields.items():
        if value is not None and (not value.isprintable() or not 0 < len(value) <= TEXT_LIMIT):
            raise MandateInvalidError(f"{name} must be 1 to {TEXT_LIMIT} printable characters")


def check_terms(clients: ClientRegistry, terms: MandateTerms, now: int) -> Client:
    check_text(
        grantor_person=terms.grantor_person,
        document_ref=terms.document_ref,
        revocation_path=terms.revocation_path,
    )
    for name in ("effective_from", "effective_until"):
        value = getattr(terms, name)
        if value is not None and not 0 <= value <= MAX_TIME:
            raise MandateInvalidError(f"{name} must be between 0 and {MAX_TIME} (epoch seconds)")
    client = clients.get(terms.grantee_client_id)
    if client is None or not client.active:
        raise MandateInvalidError(
            f"grantee client {terms.grantee_client_id!r} is not an active client"
        )
    if not stdnum_lei.is_valid(terms.grantor_lei) or terms.grantor_lei != terms.grantor_lei.upper():
        raise MandateInvalidError("grantor_lei is not a valid ISO 17442 LEI")
    if not terms.scopes:
        raise MandateInvalidError("a mandate needs at least one scope")
    outside = sorted(set(terms.scopes) - client.scopes)
    if outside:
        raise MandateInvalidError(
            f"scopes not registered for the grantee client: {', '.join(outside)}"
        )
    start = terms.effective_from if terms.effective_from is not None else now
    if terms.effective_until is not None and terms.effective_until <= max(start, now):
        raise MandateInvalidError("effective_until must be after effective_from and in the future")
    if terms.legal_basis is not LegalBasis.MANDATE and not terms.document_ref:
        raise MandateInvalidError(f"legal basis {terms.legal_basis.value} needs a document_ref")
    return client


def terms_of(old: Version, changes: dict[str, Any]) -> MandateTerms:
    values: dict[str, Any] = {
        "grantor_lei": old.grantor_lei,
        "grantee_client_id": old.grantee_client_id,
        "scopes": old.scopes,
        "authorization_details": old.authorization_details,
        "effective_from": old.effective_from,
        "effective_until": old.effective_until,
        "legal_basis": old.legal_basis,
        "document_ref": old.document_ref,
        "grantor_person": old.grantor_person,
        "revocation_path": old.revocation_path,
    }
    values.update(changes)
    values["scopes"] = tuple(values["scopes"])
    values["authorization_details"] = tuple(values["authorization_details"])
    values["legal_basis"] = LegalBasis(values["legal_basis"])
    return MandateTerms(**values)


def as_mandate(v: Version, head: Head, now: int) -> Mandate:
    """One version as the rest of the server sees it, its status resolved at ``now``."""
    return Mandate(
        id=v.mandate_id,
        version=v.version,
        grantor_lei=v.grantor_lei,
        grantor_person=v.grantor_person,
        grantee_client_id=v.grantee_client_id,
        grantee_lei=v.grantee_lei,
        scopes=v.scopes,
        authorization_details=v.authorization_details,
        effective_from=v.effective_from,
        effective_until=v.effective_until,
        legal_basis=v.legal_basis,
        document_ref=v.document_ref,
        status=resolve_status(head.status, v.version, head.current_version, v.effective_until, now),
        accepted_by=v.accepted_by,
        accepted_at=v.accepted_at,
        created_by=v.created_by,
        created_at=v.created_at,
        revocation_path=v.revocation_path,
        recorded_status=head.status,
        current_version=head.current_version,
        status_reason=head.status_reason,
    )


def audit_event(
    issuer: str, version: Version, change: MandateChange, previous_version: int | None = None
) -> AuditEvent:
    """The audit record of one change: ids, parties, scopes and details digest in the envelope;
    actor, legal basis and document reference in the payload."""
    payload: dict[str, Any] = {"actor": change.actor, "status": change.status.value,
                               "legal_basis": version.legal_basis.value}  # fmt: skip
    if version.document_ref:
        payload["document_ref"] = version.document_ref
    if previous_version is not None:
        payload["previous_version"] = previous_version
    event = AuditEvent(
        type=_AUDIT[change.action],
        issuer=issuer,
        subject=version.grantor_person,
        client_id=version.grantee_client_id,
        partner=version.grantor_lei,
        scopes=version.scopes,
        authorization_details_digest=version.details_digest or None,
        mandate_id=version.mandate_id,
        mandate_version=change.version,
        reason=change.reason,
        service="trustplane.mandates",
        payload=payload,
    )
    return event
