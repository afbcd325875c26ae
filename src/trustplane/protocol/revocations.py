"""Revoked access tokens, by ``jti`` (RFC 7009). Rows live until the token would have expired anyway.

Every new revocation bumps the ``revocations`` cache generation in the same transaction, so processes
that keep the revocation list in memory (``trustplane.bearer_guard.revoked``) reload it.

The server holds ONE :class:`RevocationStore`, built by the composition root (``trustplane.app``):
``bearer_guard.RevokedTokens``, this SQL store plus the in-memory list, so that a revocation made by
any component of this process is refused by the bearer guard at once."""

from __future__ import annotations

import functools
import time
from typing import Protocol

from sqlalchemy import BigInteger, Column, String, Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.storage import generations
from trustplane.storage.driver_sql import in_transaction
from trustplane.storage.metadata import metadata
from trustplane.storage.prune import delete_expired

GENERATION = "revocations"

revoked_tokens = Table(
    "revoked_tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
    Column("revoked_at", BigInteger, nullable=False),
)


class RevocationStore(Protocol):
    """Revoked access tokens by ``jti``. Every method runs in the caller's transaction (the unit of
    work owns it; a store never commits)."""

    async def revoke(
        self, conn: AsyncConnection, jti: str, client_id: str, expires_at: int
    ) -> bool:
        """Revoke ``jti`` until ``expires_at`` (idempotent). True if this call revoked it, False if it
        already was. After commit, :meth:`is_revoked` is true for it in every process."""
        ...

    async def is_revoked(self, conn: AsyncConnection, jti: str) -> bool:
        """Whether ``jti`` is revoked, as the database says now (no cache)."""
        ...

    async def prune(self, conn: AsyncConnection, now: int) -> int:
        """Forget revocations of tokens that expired before ``now`` (they are refused as expired
        anyway); returns how many rows went."""
        ...


class SqlRevocationStore:
    async def revoke(
        self, conn: AsyncConnection, jti: str, client_id: str, expires_at: int
    ) -> bool:
        """True if this call revoked it (False: it already was). A new revocation bumps
        :data:`GENERATION` in the caller's transaction."""
        dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        result = await conn.execute(
            dialect_insert(revoked_tokens)
            .values(
                jti=jti, client_id=client_id, expires_at=expires_at, revoked_at=int(time.time())
            )
            .on_conflict_do_nothing(index_elements=["jti"])
        )
        fresh = bool(result.rowcount == 1)
        if fresh:
            await generations.bump(conn, GENERATION)
        return fresh

    async def is_revoked(self, conn: AsyncConnection, jti: str) -> bool:
        """Driver-level SQL (``storage.driver_sql``): introspection asks this once per request, and
        the Core ``select`` cost more client CPU (its cache key, parameter processing and result
        wrapping) than the primary-key lookup it sends."""
        if conn.dialect.name == "postgresql":
            rows = await conn.exec_driver_sql(_PG_IS_REVOKED, (jti,))
        else:
            rows = await conn.exec_driver_sql(_SQLITE_IS_REVOKED, (jti,))
        return rows.first() is not None

    async def prune(self, conn: AsyncConnection, now: int) -> int:
        return await delete_expired(conn, revoked_tokens, revoked_tokens.c.expires_at, now)


async def revoked_among(conn: AsyncConnection, jtis: set[str]) -> set[str]:
    """Which of ``jtis`` are revoked (one query; the token endpoint's outcome batch uses it, once
    per batch of exchanges). Driver-level SQL (``storage.driver_sql``): the Core ``IN`` was
    compiled and its parameters processed anew for every batch, ~20 us of writer CPU per exchange
    on SQLite. PostgreSQL: one array parameter, sent on the writer's open transaction when there is
    one; SQLite: one placeholder per ``jti``."""
    if conn.dialect.name == "postgresql":
        driver = await in_transaction(conn)
        if driver is not None:
            return {row[0] for row in await driver.fetch(_PG_REVOKED, list(jtis))}
        rows = await conn.exec_driver_sql(_PG_REVOKED, (list(jtis),))
    else:
        rows = await conn.exec_driver_sql(_sqlite_revoked(len(jtis)), tuple(jtis))
    return {row[0] for row in rows}


_PG_IS_REVOKED = "SELECT 1 FROM revoked_tokens WHERE jti = $1"
_SQLITE_IS_REVOKED = "SELECT 1 FROM revoked_tokens WHERE jti = ?"
_PG_REVOKED = "SELECT jti FROM revoked_tokens WHERE jti = ANY($1::text[])"


@functools.lru_cache(maxsize=64)
def _sqlite_revoked(count: int) -> str:
    return f"SELECT jti FROM revoked_tokens WHERE jti IN ({', '.join('?' * count)})"  # noqa: S608 - placeholders only
