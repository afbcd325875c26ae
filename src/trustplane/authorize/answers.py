"""One answer per authorization request: the consent form is single-use.

Every request that enters ``/authorize`` gets a random id, sealed with it in the hidden ``request``
field and kept when the field is sealed again (the login page, a new session id at login), and a
deadline that is kept too (``REQUEST_LIFETIME`` after it entered). Approving or denying claims the id
here, first, in the transaction that writes the answer (the mandate, the code, the audit events):
a second POST of the same form, a double submit or a captured form replayed, finds the id taken and
is refused with nothing written. Of racing posts exactly one claims it (an ``INSERT ... ON CONFLICT
DO NOTHING`` on the primary key: on PostgreSQL the others wait for the claimant's commit and then
insert nothing; on SQLite the claim is the transaction's first statement, so the others wait for the
write lock and then see the row).

What must hold after ``claim``: the id's row exists with the request's deadline, True only for the
caller whose insert made it. A row is pruned only after the deadline, when no form carrying its id
can be opened any more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import BigInteger, Column, String, Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.storage.metadata import metadata
from trustplane.storage.prune import delete_expired

authorization_answers = Table(
    "authorization_answers",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("expires_at", BigInteger, nullable=False, index=True),
)


class AnswerStore(Protocol):
    """The ids of the authorization requests already answered; the caller owns the transaction."""

    async def claim(self, conn: AsyncConnection, request_id: str, expires_at: int) -> bool:
        """Record that ``request_id`` is answered; True only for the first caller."""

    async def prune(self, conn: AsyncConnection, before: int) -> int:
        """Delete ids whose request expired before ``before``; returns how many."""


class SqlAnswerStore:
    async def claim(self, conn: AsyncConnection, request_id: str, expires_at: int) -> bool:
        dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        result = await conn.execute(
            dialect_insert(authorization_answers)
            .values(request_id=request_id, expires_at=expires_at)
            .on_conflict_do_nothing(index_elements=["request_id"])
        )
        return bool(result.rowcount == 1)

    async def prune(self, conn: AsyncConnection, before: int) -> int:
        t = authorization_answers
        return await delete_expired(conn, t, t.c.expires_at, before)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the consent form claims: its request's id and the deadline of every form carrying it."""

    request_id: str
    expires_at: int
