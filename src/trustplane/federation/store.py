"""Trust profile storage. Stores never commit; the caller's unit of work does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.federation.tables import partner_issuers, partner_profiles


@dataclass(frozen=True, slots=True)
class StoredProfile:
    """One version of a partner's profile as stored (the document is the validated, normalised one)."""

    partner_id: str
    version: int
    status: str
    document: dict[str, Any]
    created_at: int
    changed_by: str


class VersionConflictError(Exception):
    """Another writer stored a version of this partner first (or the issuer belongs to another)."""


class PartnerStore(Protocol):
    async def current(self, conn: AsyncConnection, partner_id: str) -> StoredProfile | None:
        """The newest version of the partner; None if it was never added."""

    async def list_current(self, conn: AsyncConnection) -> list[StoredProfile]:
        """The newest version of every partner, ordered by partner_id."""

    async def history(self, conn: AsyncConnection, partner_id: str) -> list[StoredProfile]:
        """Every version of the partner, oldest first."""

    async def append(self, conn: AsyncConnection, profile: StoredProfile) -> None:
        """Insert ``profile`` as a new version. It must be exactly one more than the current version
        (1 for a new partner); a concurrent writer that got there first makes this raise
        :class:`VersionConflictError` (the primary key decides), so no version is ever lost."""

    async def claim_issuers(
        self, conn: AsyncConnection, partner_id: str, issuers: list[str]
    ) -> list[str]:
        """Make ``issuers`` exactly the partner's issuers. Returns the issuers already owned by
        another partner (nothing is changed then)."""


def _from_row(row: dict[str, object]) -> StoredProfile:
    return StoredProfile(
        partner_id=str(row["partner_id"]),
        version=int(str(row["version"])),
        status=str(row["status"]),
        document=orjson.loads(str(row["document"])),
        created_at=int(str(row["created_at"])),
        changed_by=str(row["changed_by"]),
    )


class SqlPartnerStore:
    async def current(self, conn: AsyncConnection, partner_id: str) -> StoredProfile | None:
        p = partner_profiles.c
        query = (
            select(partner_profiles)
            .where(p.partner_id == partner_id)
            .order_by(p.version.desc())
            .limit(1)
        )
        row = (await conn.execute(query)).mappings().first()
        return _from_row(dict(row)) if row else None

    async def list_current(self, conn: AsyncConnection) -> list[StoredProfile]:
        p = partner_profiles.c
        newest = (
            select(p.partner_id, func.max(p.version).label("version"))
            .group_by(p.partner_id)
            .subquery()
        )
        query = (
            select(partner_profiles)
            .join(newest, (p.partner_id == newest.c.partner_id) & (p.version == newest.c.version))
            .order_by(p.partner_id)
        )
        return [_from_row(dict(r)) for r in (await conn.execute(query)).mappings().all()]

    async def history(self, conn: AsyncConnection, partner_id: str) -> list[StoredProfile]:
        p = partner_profiles.c
        query = select(partner_profiles).where(p.partner_id == partner_id).order_by(p.version)
        return [_from_row(dict(r)) for r in (await conn.execute(query)).mappings().all()]

    async def append(self, conn: AsyncConnection, profile: StoredProfile) -> None:
        current = await self.current(conn, profile.partner_id)
        expected = (current.version if current else 0) + 1
        if profile.version != expected:
            raise VersionConflictError(
                f"partner {profile.partner_id}: version {profile.version}, expected {expected}"
            )
        try:  # the transaction is unusable after a conflict: the caller's unit of work rolls back
            await conn.execute(
                insert(partner_profiles).values(
                    partner_id=profile.partner_id,
                    version=profile.version,
                    status=profile.status,
                    document=orjson.dumps(profile.document).decode(),
                    created_at=profile.created_at,
                    changed_by=profile.changed_by,
                )
            )
        except IntegrityError:
            raise VersionConflictError(
                f"partner {profile.partner_id}: version {profile.version} was stored concurrently"
            ) from None

    async def claim_issuers(
        self, conn: AsyncConnection, partner_id: str, issuers: list[str]
    ) -> list[str]:
        i = partner_issuers.c
        rows = await conn.execute(
            select(i.issuer).where(i.issuer.in_(issuers), i.partner_id != partner_id)
        )
        taken = sorted(str(issuer) for issuer in rows.scalars())
        if taken:
            return taken
        await conn.execute(delete(partner_issuers).where(i.partner_id == partner_id))
        try:
            await conn.execute(
                insert(partner_issuers), [{"issuer": s, "partner_id": partner_id} for s in issuers]
            )
        except IntegrityError:
            raise VersionConflictError(
                f"partner {partner_id}: an issuer was claimed concurrently by another partner"
            ) from None
        return []
