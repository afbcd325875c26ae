"""Partner onboarding and changes: every change is a new stored version and an audit event, in one
transaction, and bumps the ``partners`` generation so that every process reloads its registry."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane import metrics
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.federation.profile import (
    ProfileError,
    ProfileStatus,
    TrustProfile,
    build_profile,
    inline_keys,
    validate_profile,
)
from trustplane.federation.registry import PartnerRegistry
from trustplane.federation.store import PartnerStore, StoredProfile, VersionConflictError
from trustplane.protocol.scopes import Vocabulary
from trustplane.settings import Settings
from trustplane.storage import generations
from trustplane.storage.db import Database

GENERATION = "partners"
AuditWriter = Callable[[AsyncConnection, list[AuditEvent]], Awaitable[object]]
log = structlog.get_logger("trustplane.federation")


class PartnerNotFoundError(LookupError):
    """No partner with that id."""


class PartnerExistsError(ValueError):
    """``add`` of a partner id that is already registered (use ``update``)."""


class FederationService:
    def __init__(
        self,
        db: Database,
        store: PartnerStore,
        settings: Settings,
        vocabulary: Vocabulary,
        audit_writer: AuditWriter,
        remote_jwks: RemoteJwksCache,
    ) -> None:
        self._db, self._store, self._settings = db, store, settings
        self._vocabulary, self._audit = vocabulary, audit_writer
        self.registry = PartnerRegistry(settings, remote_jwks)

    def validate(self, raw: Any) -> TrustProfile:
        return validate_profile(raw, self._settings, self._vocabulary)

    async def load(self) -> None:
        async with self._db.read() as conn:
            stored = await self._store.list_current(conn)
        self.registry.replace_all([p for p in (self._rebuild(s) for s in stored) if p])
        metrics.PARTNERS.set(len(self.registry))

    async def current(self) -> list[StoredProfile]:
        """The current version of every partner."""
        async with self._db.read() as conn:
            return await self._store.list_current(conn)

    async def get(self, partner_id: str) -> StoredProfile:
        async with self._db.read() as conn:
            stored = await self._store.current(conn, partner_id)
        if stored is None:
            raise PartnerNotFoundError(partner_id)
        return stored

    async def history(self, partner_id: str) -> list[StoredProfile]:
        async with self._db.read() as conn:
            versions = await self._store.history(conn, partner_id)
        if not versions:
            raise PartnerNotFoundError(partner_id)
        return versions

    async def add(self, raw: Any, *, changed_by: str) -> StoredProfile:
        """Register a new partner (version 1). Raises :class:`ProfileError`, :class:`PartnerExistsError`."""
        profile = self.validate(raw)
        return await self._write(profile, changed_by, AuditEventType.PARTNER_ADDED, new=True)

    async def update(self, partner_id: str, raw: Any, *, changed_by: str) -> StoredProfile:
        """Store a new version of an existing partner's profile (the document names the partner)."""
        profile = self.validate(raw)
        if profile.partner_id != partner_id:
            raise ProfileError([f"partner_id: the document is for {profile.partner_id!r}"])
        event = (
            AuditEventType.PARTNER_DISABLED
            if profile.status is ProfileStatus.DISABLED
            else AuditEventType.PARTNER_UPDATED
        )
        return await self._write(profile, changed_by, event, new=False)

    async def disable(self, partner_id: str, *, changed_by: str, reason: str = "") -> StoredProfile:
        """A new version with ``status: disabled``: every assertion from the partner is refused."""
        current = await self.get(partner_id)
        document = {**current.document, "status": ProfileStatus.DISABLED.value}
        profile = build_profile(document, [])
        return await self._write(
            profile, changed_by, AuditEventType.PARTNER_DISABLED, new=False, reason=reason
        )

    async def _write(
        self,
        profile: TrustProfile,
        changed_by: str,
        event: AuditEventType,
        *,
        new: bool,
        reason: str = "",
    ) -> StoredProfile:
        async with self._db.transaction() as conn:
            current = await self._store.current(conn, profile.partner_id)
            if new and current is not None:
                raise PartnerExistsError(f"partner {profile.partner_id} exists: update it instead")
            if not new and current is None:
                raise PartnerNotFoundError(profile.partner_id)
            stored = StoredProfile(
                partner_id=profile.partner_id,
                version=(current.version if current else 0) + 1,
                status=profile.status.value,
                document=profile.document,
                created_at=int(time.time()),
                changed_by=changed_by[:128],
            )
            taken = await self._store.claim_issuers(conn, profile.partner_id, list(profile.issuers))
            if taken:
                raise ProfileError(
                    [f"issuers: {', '.join(taken)} already belong to another partner"]
                )
            await self._store.append(conn, stored)
            await generations.bump(conn, GENERATION)
            await self._audit(conn, [self._event(event, stored, reason)])
        await self.load()
        return stored

    def _rebuild(self, stored: StoredProfile) -> TrustProfile | None:
        """A stored document back into a profile. It was validated when stored; a key that no longer
        imports (a library tightened its checks) disables that partner rather than the registry."""
        try:
            return build_profile(stored.document, inline_keys(stored.document), stored.version)
        except (ValueError, KeyError) as exc:
            log.error("partner_profile_unusable", partner=stored.partner_id, error=str(exc))
            return None

    def _event(self, type_: AuditEventType, stored: StoredProfile, reason: str) -> AuditEvent:
        doc = stored.document
        return AuditEvent(
            type=type_,
            issuer=self._settings.issuer,
            subject=stored.partner_id,
            partner=stored.partner_id,
            scopes=tuple(sorted(doc.get("allowed_scopes", ()))),
            reason=reason[:200] or None,
            service="trustplane.federation",
            payload={
                "version": stored.version,
                "status": stored.status,
                "lei": doc.get("lei"),
                "issuers": doc.get("issuers"),
                "changed_by": stored.changed_by,
            },
        )


__all__ = [
    "GENERATION",
    "FederationService",
    "PartnerExistsError",
    "PartnerNotFoundError",
    "ProfileError",
    "VersionConflictError",
]
