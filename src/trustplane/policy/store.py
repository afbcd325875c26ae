"""The bundle store: published bundles, which one is active, and the activation history.

Semantics (each method runs in the caller's transaction; the store never commits):

- ``publish`` stores a bundle's files under its content version with the change reference, author
  and time; publishing the same content again returns the stored record unchanged.
- ``activate(version, expected=...)`` makes ``version`` the one active bundle, but only if the
  active bundle is still ``expected`` (compare-and-set): of two racing activations exactly one wins,
  the other raises :class:`ActivationConflict` and changes nothing. A partial unique index on
  ``status = 'active'`` makes a second active bundle impossible whatever the code does.
- ``history`` lists activations newest first; a rollback re-activates the previous version of the
  newest activation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.policy.bundle import BundleSource
from trustplane.policy.tables import policy_activations, policy_bundles

ACTIVE, PUBLISHED, RETIRED = "active", "published", "retired"


class ActivationConflict(Exception):
    """The active bundle changed under us (another activation or rollback won the race)."""


class UnknownBundle(LookupError):
    """No published bundle has this version (or version prefix)."""


@dataclass(frozen=True, slots=True)
class BundleRecord:
    version: str
    change_ref: str
    author: str
    created_at: int
    status: str
    source: BundleSource | None = None


@dataclass(frozen=True, slots=True)
class Activation:
    version: str
    previous_version: str | None
    action: str
    actor: str
    change_ref: str | None
    time_ms: int


def _record(row: Any, with_files: bool) -> BundleRecord:
    source = BundleSource(orjson.loads(row.files)) if with_files else None
    return BundleRecord(row.version, row.change_ref, row.author, row.created_at, row.status, source)


_SUMMARY = [
    policy_bundles.c.version,
    policy_bundles.c.change_ref,
    policy_bundles.c.author,
    policy_bundles.c.created_at,
    policy_bundles.c.status,
]


class BundleStore(Protocol):
    """Published policy bundles and the one active bundle (semantics in the module docstring)."""

    async def publish(
        self, conn: AsyncConnection, source: BundleSource, change_ref: str, author: str
    ) -> tuple[BundleRecord, bool]:
        """Store the bundle under its content version; returns (record, created)."""

    async def get(self, conn: AsyncConnection, version: str) -> BundleRecord | None:
        """The bundle with its files; None if not published."""

    async def resolve(self, conn: AsyncConnection, prefix: str) -> str:
        """The full version from an unambiguous prefix of at least 8 characters, else
        :class:`UnknownBundle`."""

    async def all(self, conn: AsyncConnection) -> list[BundleRecord]:
        """Every published bundle without its files, newest first."""

    async def active_version(self, conn: AsyncConnection) -> str | None:
        """The active bundle's version; None before the first activation."""

    async def activate(
        self,
        conn: AsyncConnection,
        version: str,
        *,
        expected: str | None,
        actor: str,
        change_ref: str | None,
        action: str = "activate",
    ) -> Activation:
        """Compare-and-set the active bundle from ``expected`` to ``version`` and record the
        activation; :class:`ActivationConflict` (changing nothing) if ``expected`` is not active."""

    async def history(self, conn: AsyncConnection, limit: int = 50) -> list[Activation]:
        """Activations, newest first."""


class SqlBundleStore:
    async def publish(
        self, conn: AsyncConnection, source: BundleSource, change_ref: str, author: str
    ) -> tuple[BundleRecord, bool]:
        """Store the bundle; returns (record, created). The same content is stored once."""
        existing = await self.get(conn, source.version)
        if existing is not None:
            return existing, False
        record = BundleRecord(
            source.version, change_ref, author, time.time_ns() // 1_000_000, PUBLISHED, source
        )
        try:
            async with conn.begin_nested():
                await conn.execute(
                    insert(policy_bundles).values(
                        version=record.version,
                        change_ref=change_ref,
                        author=author,
                        created_at=record.created_at,
                        status=PUBLISHED,
                        files=orjson.dumps(
                            dict(source.files), option=orjson.OPT_SORT_KEYS
                        ).decode(),
                    )
                )
        except IntegrityError:  # published concurrently by someone else: same content, same version
            stored = await self.get(conn, source.version)
            if stored is None:
                raise
            return stored, False
        return record, True

    async def get(self, conn: AsyncConnection, version: str) -> BundleRecord | None:
        row = (
            await conn.execute(select(policy_bundles).where(policy_bundles.c.version == version))
        ).first()
        return _record(row, True) if row else None

    async def resolve(self, conn: AsyncConnection, prefix: str) -> str:
        """A full version from an unambiguous prefix (at least 8 hex digits, like git)."""
        if len(prefix) < 8:
            raise UnknownBundle(f"version {prefix!r}: give at least 8 characters")
        rows = await conn.execute(
            select(policy_bundles.c.version)
            .where(policy_bundles.c.version.startswith(prefix, autoescape=True))
            .limit(2)
        )
        found = [r[0] for r in rows]
        if len(found) != 1:
            what = "is ambiguous" if found else "matches no published bundle"
            raise UnknownBundle(f"version {prefix!r} {what}")
        return str(found[0])

    async def all(self, conn: AsyncConnection) -> list[BundleRecord]:
        rows = await conn.execute(select(*_SUMMARY).order_by(policy_bundles.c.created_at.desc()))
        return [BundleRecord(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def active(self, conn: AsyncConnection) -> BundleRecord | None:
        row = (
            await conn.execute(select(policy_bundles).where(policy_bundles.c.status == ACTIVE))
        ).first()
        return _record(row, True) if row else None

    async def active_version(self, conn: AsyncConnection) -> str | None:
        query = select(policy_bundles.c.version).where(policy_bundles.c.status == ACTIVE)
        return (await conn.execute(query)).scalar()

    async def activate(
        self,
        conn: AsyncConnection,
        version: str,
        *,
        expected: str | None,
        actor: str,
        change_ref: str | None,
        action: str = "activate",
    ) -> Activation:
        """Compare-and-set the active bundle from ``expected`` (None: no bundle active) to ``version``."""
        if await self.get_status(conn, version) is None:
            raise UnknownBundle(f"version {version!r} is not published")
        if expected == version:
            raise ActivationConflict(f"bundle {version[:12]} is already active")
        try:
            async with conn.begin_nested():
                if expected is not None:
                    retired = await conn.execute(
                        update(policy_bundles)
                        .where(policy_bundles.c.version == expected)
                        .where(policy_bundles.c.status == ACTIVE)
                        .values(status=RETIRED)
                    )
                    if retired.rowcount != 1:
                        raise ActivationConflict("the active bundle changed concurrently")
                await conn.execute(
                    update(policy_bundles)
                    .where(policy_bundles.c.version == version)
                    .values(status=ACTIVE)
                )
        except IntegrityError:  # another transaction activated a bundle first (first activation)
            raise ActivationConflict("another bundle was activated concurrently") from None
        activation = Activation(
            version, expected, action, actor, change_ref, time.time_ns() // 1_000_000
        )
        await conn.execute(
            insert(policy_activations).values(
                version=version,
                previous_version=expected,
                action=action,
                actor=actor,
                change_ref=change_ref,
                time_ms=activation.time_ms,
            )
        )
        return activation

    async def get_status(self, conn: AsyncConnection, version: str) -> str | None:
        query = select(policy_bundles.c.status).where(policy_bundles.c.version == version)
        return (await conn.execute(query)).scalar()

    async def history(self, conn: AsyncConnection, limit: int = 50) -> list[Activation]:
        rows = await conn.execute(
            select(policy_activations).order_by(policy_activations.c.seq.desc()).limit(limit)
        )
        return [
            Activation(r.version, r.previous_version, r.action, r.actor, r.change_ref, r.time_ms)
            for r in rows
        ]
