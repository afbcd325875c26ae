"""The SQLAlchemy implementation of :class:`~trustplane.pep.idempotency.IdempotencyStore`, on SQLite
(aiosqlite) and PostgreSQL (asyncpg).

The table belongs to the resource server's own database, not to trustplane's: it is created by
``await store.create_schema()`` and is not part of trustplane's migration chain. Times are stored
as Unix milliseconds.

A claim is one transaction of at most two statements: ``INSERT ... ON CONFLICT DO NOTHING`` for a
new key, then a conditional ``UPDATE`` that takes over an expired key or an abandoned lease. Racing
claimers serialise on the primary key (PostgreSQL re-checks the UPDATE's condition after the row
lock; SQLite has one writer), so exactly one wins.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Row

from trustplane.pep.idempotency import Claim, IdempotencyRecord, StoredResponse
from trustplane.storage.db import Database

IN_PROGRESS, COMPLETED = "in_progress", "completed"

metadata = MetaData()

idempotency_keys = Table(
    "pep_idempotency_keys",
    metadata,
    Column("scope", String(512), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("claim_token", String(64), nullable=False),
    Column("lease_until", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
    Column("status", Integer),
    Column("content_type", String(255)),
    Column("location", Text),
    Column("body", LargeBinary),
)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class SqlIdempotencyStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def create_schema(self) -> None:
        """Create the table if it does not exist (the resource server calls this at start-up)."""
        async with self.db.transaction() as conn:
            await conn.run_sync(metadata.create_all)

    async def claim(
        self, claim: Claim, *, now: float, lease_until: float, expires_at: float
    ) -> bool:
        row = {
            "fingerprint": claim.fingerprint,
            "state": IN_PROGRESS,
            "claim_token": claim.token,
            "lease_until": _ms(lease_until),
            "expires_at": _ms(expires_at),
        }
        dialect_insert = pg_insert if self.db.dialect == "postgresql" else sqlite_insert
        insert = (
            dialect_insert(idempotency_keys)
            .values(scope=claim.scope, key=claim.key, **row)
            .on_conflict_do_nothing(index_elements=["scope", "key"])
        )
        async with self.db.transaction() as conn:
            if (await conn.execute(insert)).rowcount == 1:
                return True
            result = await conn.execute(_takeover(claim, _ms(now)).values(**_cleared(row)))
            return bool(result.rowcount == 1)

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        query = select(idempotency_keys).where(_row(scope, key))
        async with self.db.read() as conn:
            found = (await conn.execute(query)).first()
        return None if found is None else _record(found)

    async def complete(self, claim: Claim, response: StoredResponse) -> bool:
        stored = update(idempotency_keys).where(_owned(claim))
        values = {
            "state": COMPLETED,
            "status": response.status,
            "body": response.body,
            "content_type": response.content_type,
            "location": response.location,
        }
        async with self.db.transaction() as conn:
            return bool((await conn.execute(stored.values(**values))).rowcount == 1)

    async def release(self, claim: Claim) -> bool:
        async with self.db.transaction() as conn:
            result = await conn.execute(delete(idempotency_keys).where(_owned(claim)))
            return bool(result.rowcount == 1)

    async def purge(self, before: float) -> int:
        expired = delete(idempotency_keys).where(idempotency_keys.c.expires_at <= _ms(before))
        async with self.db.transaction() as conn:
            return int((await conn.execute(expired)).rowcount or 0)


def _row(scope: str, key: str) -> Any:
    return and_(idempotency_keys.c.scope == scope, idempotency_keys.c.key == key)


def _owned(claim: Claim) -> Any:
    return and_(
        _row(claim.scope, claim.key),
        idempotency_keys.c.claim_token == claim.token,
        idempotency_keys.c.state == IN_PROGRESS,
    )


def _takeover(claim: Claim, now_ms: int) -> Any:
    """The UPDATE that takes over an expired key, or an abandoned claim of the same payload."""
    t = idempotency_keys.c
    abandoned = and_(
        t.state == IN_PROGRESS, t.lease_until <= now_ms, t.fingerprint == claim.fingerprint
    )
    return update(idempotency_keys).where(
        _row(claim.scope, claim.key), or_(t.expires_at <= now_ms, abandoned)
    )


def _cleared(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "status": None, "body": None, "content_type": None, "location": None}


def _record(row: Row[Any]) -> IdempotencyRecord:
    response = None
    if row.state == COMPLETED:
        response = StoredResponse(row.status, bytes(row.body), row.content_type, row.location)
    return IdempotencyRecord(
        row.fingerprint, row.lease_until / 1000, row.expires_at / 1000, response
    )
