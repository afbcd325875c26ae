"""Mandate storage: the interface the service needs and its SQLAlchemy implementation.

Every method runs in the caller's transaction (stores never commit). :meth:`MandateStore.lock` is
the one way into a change: it takes the row lock (PostgreSQL) or the write lock (SQLite) before
anything is read, so two racing changes of one mandate are applied one after the other, each seeing
the other's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from sqlalchemy import and_, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.mandates.model import (
    LegalBasis,
    MandateAction,
    MandateChange,
    MandateFilter,
    MandateStatus,
)
from trustplane.mandates.tables import EXPIRY_DUE, mandate_changes, mandate_versions, mandates


@dataclass(frozen=True, slots=True)
class Head:
    """The mandate row: lifecycle and the current version's dates (what the usability check reads)."""

    id: str
    current_version: int
    status: MandateStatus
    status_reason: str | None
    grantor_lei: str
    grantee_client_id: str
    effective_from: int
    effective_until: int | None
    created_at: int
    updated_at: int
    expiry_notified_at: int | None = None  # when the expiry security event was stored


@dataclass(frozen=True, slots=True)
class Version:
    """One immutable version of the terms."""

    mandate_id: str
    version: int
    grantor_lei: str
    grantor_person: str | None
    grantee_client_id: str
    grantee_lei: str
    scopes: tuple[str, ...]
    authorization_details: tuple[dict[str, Any], ...]
    details_digest: str
    effective_from: int
    effective_until: int | None
    legal_basis: LegalBasis
    document_ref: str | None
    revocation_path: str
    accepted_by: str | None
    accepted_at: int | None
    created_by: str
    created_at: int


class MandateStore(Protocol):
    async def lock(self, conn: AsyncConnection, mandate_id: str) -> Head | None:
        """Lock the mandate for the rest of the transaction and return it; None if unknown."""

    async def save(
        self, conn: AsyncConnection, head: Head, version: Version | None, change: MandateChange
    ) -> None:
        """Upsert the head, insert ``version`` (if a new one) and append ``change``."""

    async def head(self, conn: AsyncConnection, mandate_id: str) -> Head | None: ...

    async def versions(
        self, conn: AsyncConnection, mandate_id: str, version: int | None = None
    ) -> list[Version]:
        """All versions in order, or just ``version``."""

    async def changes(self, conn: AsyncConnection, mandate_id: str) -> list[MandateChange]: ...

    async def expired_unnotified(self, conn: AsyncConnection, now: int, limit: int) -> list[str]:
        """Ids of mandates past ``effective_until``, not revoked, whose expiry event is not out."""

    async def heads(self, conn: AsyncConnection, flt: MandateFilter, now: int) -> list[Head]: ...


_HEAD_COLUMNS = [c for c in mandates.c if c.name != "row_version"]


def _head(row: Any) -> Head:
    values = dict(row._mapping)
    values.pop("row_version", None)
    values["status"] = MandateStatus(values["status"])
    return Head(**values)


def _version(row: Any) -> Version:
    values = dict(row._mapping)
    values["scopes"] = tuple(values["scopes"].split())
    values["authorization_details"] = tuple(orjson.loads(values["authorization_details"]))
    values["legal_basis"] = LegalBasis(values["legal_basis"])
    return Version(**values)


class SqlMandateStore:
    async def lock(self, conn: AsyncConnection, mandate_id: str) -> Head | None:
        # An UPDATE first: the lock is taken before the read on both databases (a SQLite read
        # transaction that later writes could fail with SQLITE_BUSY instead of waiting).
        row = (
            await conn.execute(
                update(mandates)
                .where(mandates.c.id == mandate_id)
                .values(row_version=mandates.c.row_version + 1)
                .returning(*_HEAD_COLUMNS)
            )
        ).first()
        return _head(row) if row is not None else None

    async def save(
        self, conn: AsyncConnection, head: Head, version: Version | None, change: MandateChange
    ) -> None:
        values = {
            "current_version": head.current_version,
            "status": head.status.value,
            "status_reason": head.status_reason,
            "grantor_lei": head.grantor_lei,
            "grantee_client_id": head.grantee_client_id,
            "effective_from": head.effective_from,
            "effective_until": head.effective_until,
            "updated_at": head.updated_at,
            "expiry_notified_at": head.expiry_notified_at,
        }
        updated = await conn.execute(
            update(mandates).where(mandates.c.id == head.id).values(**values)
        )
        if updated.rowcount == 0:
            await conn.execute(
                insert(mandates).values(
                    id=head.id, created_at=head.created_at, row_version=1, **values
                )
            )
        if version is not None:
            await conn.execute(insert(mandate_versions).values(**_version_values(version)))
        await conn.execute(
            insert(mandate_changes).values(
                mandate_id=change.mandate_id,
                version=change.version,
                action=change.action.value,
                status=change.status.value,
                actor=change.actor,
                reason=change.reason,
                at=change.at,
            )
        )

    async def set_acceptance(
        self, conn: AsyncConnection, mandate_id: str, version: int, by: str, at: int
    ) -> None:
        await conn.execute(
            update(mandate_versions)
            .where(
                mandate_versions.c.mandate_id == mandate_id, mandate_versions.c.version == version
            )
            .values(accepted_by=by, accepted_at=at)
        )

    async def head(self, conn: AsyncConnection, mandate_id: str) -> Head | None:
        row = (
            await conn.execute(select(*_HEAD_COLUMNS).where(mandates.c.id == mandate_id))
        ).first()
        return _head(row) if row is not None else None

    async def versions(
        self, conn: AsyncConnection, mandate_id: str, version: int | None = None
    ) -> list[Version]:
        query = select(mandate_versions).where(mandate_versions.c.mandate_id == mandate_id)
        if version is not None:
            query = query.where(mandate_versions.c.version == version)
        rows = await conn.execute(query.order_by(mandate_versions.c.version))
        return [_version(r) for r in rows]

    async def changes(self, conn: AsyncConnection, mandate_id: str) -> list[MandateChange]:
        rows = await conn.execute(
            select(mandate_changes)
            .where(mandate_changes.c.mandate_id == mandate_id)
            .order_by(mandate_changes.c.seq)
        )
        return [
            MandateChange(
                r.mandate_id,
                r.version,
                MandateAction(r.action),
                MandateStatus(r.status),
                r.actor,
                r.reason,
                r.at,
            )
            for r in rows
        ]

    async def expired_unnotified(self, conn: AsyncConnection, now: int, limit: int) -> list[str]:
        """Ids of mandates past ``effective_until``, not revoked, whose expiry event is not out."""
        c = mandates.c
        rows = await conn.execute(
            select(c.id)
            .where(c.effective_until <= now, text(EXPIRY_DUE))  # ix_mandates_expiry_due's rows
            .order_by(c.effective_until)
            .limit(limit)
        )
        return [str(r) for r in rows.scalars()]

    async def heads(self, conn: AsyncConnection, flt: MandateFilter, now: int) -> list[Head]:
        query = select(*_HEAD_COLUMNS).where(*_conditions(flt, now))
        rows = await conn.execute(query.order_by(mandates.c.created_at.desc()).limit(flt.limit))
        return [_head(r) for r in rows]


def _conditions(flt: MandateFilter, now: int) -> list[Any]:
    c = mandates.c
    out: list[Any] = []
    if flt.grantor_lei:
        out.append(c.grantor_lei == flt.grantor_lei)
    if flt.grantee_client_id:
        out.append(c.grantee_client_id == flt.grantee_client_id)
    not_expired = or_(c.effective_until.is_(None), c.effective_until > now)
    if flt.status is MandateStatus.EXPIRED:
        out += [c.status != MandateStatus.REVOKED.value, c.effective_until <= now]
    elif flt.status is not None:
        out.append(c.status == flt.status.value)
        if flt.status is not MandateStatus.REVOKED:
            out.append(not_expired)
    if flt.expiring_within is not None:
        out += [
            c.status != MandateStatus.REVOKED.value,
            and_(c.effective_until > now, c.effective_until <= now + flt.expiring_within),
        ]
    return out


def _version_values(v: Version) -> dict[str, Any]:
    return {
        "mandate_id": v.mandate_id,
        "version": v.version,
        "grantor_lei": v.grantor_lei,
        "grantor_person": v.grantor_person,
        "grantee_client_id": v.grantee_client_id,
        "grantee_lei": v.grantee_lei,
        "scopes": " ".join(v.scopes),
        "authorization_details": orjson.dumps(list(v.authorization_details)).decode(),
        "details_digest": v.details_digest,
        "effective_from": v.effective_from,
        "effective_until": v.effective_until,
        "legal_basis": v.legal_basis.value,
        "document_ref": v.document_ref,
        "revocation_path": v.revocation_path,
        "accepted_by": v.accepted_by,
        "accepted_at": v.accepted_at,
        "created_by": v.created_by,
        "created_at": v.created_at,
    }
