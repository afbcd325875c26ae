"""The ``users`` table and its store. Stores never commit: the caller's transaction does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    String,
    Table,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.storage.metadata import metadata
from trustplane.users.model import User, UserStatus

users = Table(
    "users",
    metadata,
    Column("user_id", String(32), primary_key=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("display_name", String(200), nullable=False),
    Column("lei", String(20), nullable=False, index=True),
    Column("password_hash", String(256), nullable=False),
    Column("totp_secret", LargeBinary),  # AES-GCM under the KEK, bound to the user id
    Column("totp_last_step", BigInteger),
    Column("status", String(16), nullable=False),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked_until", BigInteger, nullable=False, default=0),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("last_login_at", BigInteger),
)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a login check needs, kept out of :class:`User`."""

    user: User
    password_hash: str
    totp_secret: bytes | None
    totp_last_step: int | None


def _user(row: Any) -> User:
    return User(
        user_id=row.user_id,
        username=row.username,
        display_name=row.display_name,
        lei=row.lei,
        status=UserStatus(row.status),
        totp_enabled=row.totp_secret is not None,
        failed_logins=row.failed_logins,
        locked_until=row.locked_until,
        created_at=row.created_at,
        last_login_at=row.last_login_at,
    )


class UserStore(Protocol):
    """Local users (login at the authorization endpoint). Password hashes and TOTP secrets are
    read only through :meth:`credentials`, never as part of a :class:`User`."""

    async def add(self, conn: AsyncConnection, user: User, password_hash: str, now: int) -> None:
        """Insert; the user id and the username must be new."""

    async def credentials(self, conn: AsyncConnection, username: str) -> Credentials | None:
        """What a login check needs; None if there is no such username."""

    async def get(
        self, conn: AsyncConnection, *, user_id: str | None = None, username: str | None = None
    ) -> User | None:
        """By ``user_id`` if given, else by ``username``; None if unknown."""

    async def list(self, conn: AsyncConnection) -> list[User]:
        """Every user, ordered by username."""

    async def update(self, conn: AsyncConnection, user_id: str, now: int, **values: Any) -> bool:
        """Set columns of one user; False if there is no such user."""

    async def record_failure(
        self, conn: AsyncConnection, user_id: str, now: int, max_failures: int, base_lockout: int
    ) -> int:
        """Count one failed login atomically (locking the account past ``max_failures``);
        returns the new count."""

    async def record_success(
        self, conn: AsyncConnection, user_id: str, now: int, totp_step: int | None
    ) -> bool:
        """Reset the failure count; with a TOTP step, True only if it is newer than the last
        accepted one (of two logins racing with one code, one wins)."""


class SqlUserStore:
    async def add(self, conn: AsyncConnection, user: User, password_hash: str, now: int) -> None:
        await conn.execute(
            insert(users).values(
                user_id=user.user_id,
                username=user.username,
                display_name=user.display_name,
                lei=user.lei,
                password_hash=password_hash,
                status=user.status.value,
                failed_logins=0,
                locked_until=0,
                created_at=now,
                updated_at=now,
            )
        )

    async def credentials(self, conn: AsyncConnection, username: str) -> Credentials | None:
        row = (await conn.execute(select(users).where(users.c.username == username))).first()
        if row is None:
            return None
        return Credentials(_user(row), row.password_hash, row.totp_secret, row.totp_last_step)

    async def get(
        self, conn: AsyncConnection, *, user_id: str | None = None, username: str | None = None
    ) -> User | None:
        column, value = (users.c.user_id, user_id) if user_id else (users.c.username, username)
        row = (await conn.execute(select(users).where(column == value))).first()
        return None if row is None else _user(row)

    async def list(self, conn: AsyncConnection) -> list[User]:
        rows = await conn.execute(select(users).order_by(users.c.username))
        return [_user(r) for r in rows]

    async def update(self, conn: AsyncConnection, user_id: str, now: int, **values: Any) -> bool:
        """Set columns of one user; False if there is no such user."""
        result = await conn.execute(
            update(users).where(users.c.user_id == user_id).values(updated_at=now, **values)
        )
        return bool(result.rowcount == 1)

    async def record_failure(
        self, conn: AsyncConnection, user_id: str, now: int, max_failures: int, base_lockout: int
    ) -> int:
        """Count one failed login atomically; past ``max_failures`` lock the account for
        ``base_lockout`` seconds, doubling with every further failure, at most an hour.
        Returns the new count."""
        await conn.execute(
            update(users)
            .where(users.c.user_id == user_id)
            .values(failed_logins=users.c.failed_logins + 1, updated_at=now)
        )
        count = int(
            (
                await conn.execute(select(users.c.failed_logins).where(users.c.user_id == user_id))
            ).scalar_one()
        )
        if count >= max_failures:
            lock = min(base_lockout * 2 ** min(count - max_failures, 20), 3600)
            await conn.execute(
                update(users).where(users.c.user_id == user_id).values(locked_until=now + lock)
            )
        return count

    async def record_success(
        self, conn: AsyncConnection, user_id: str, now: int, totp_step: int | None
    ) -> bool:
        """Reset the failure count; with a TOTP step, accept it only if it is newer than the last
        accepted one (conditional update: two logins racing with one code, one wins)."""
        query = update(users).where(users.c.user_id == user_id)
        values: dict[str, Any] = {"failed_logins": 0, "locked_until": 0, "last_login_at": now}
        if totp_step is not None:
            query = query.where(
                (users.c.totp_last_step.is_(None)) | (users.c.totp_last_step < totp_step)
            )
            values["totp_last_step"] = totp_step
        result = await conn.execute(query.values(updated_at=now, **values))
        return bool(result.rowcount == 1)
