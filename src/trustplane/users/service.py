"""Local users: creation and maintenance (CLI), and the password + optional TOTP check at login.

A failed login looks the same whatever failed (unknown user, wrong password, wrong or replayed
one-time code, disabled or locked account) and costs the same: one argon2id verification. After
``login_max_failures`` consecutive failures the account is locked for ``login_lockout`` seconds,
doubling with every further failure (at most an hour); a successful login resets the count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.users import passwords, totp
from trustplane.users.model import (
    User,
    UserError,
    UserStatus,
    check_lei,
    new_user_id,
    normalise_username,
)
from trustplane.users.store import UserStore

EventWriter = Callable[[AsyncConnection, Sequence[AuditEvent]], Awaitable[object]]
ACR_PASSWORD = "urn:trustplane:acr:password"
ACR_MFA = "urn:trustplane:acr:password+totp"


class LoginFailedError(Exception):
    """The credentials were not accepted. Deliberately says nothing about which part failed."""


@dataclass(frozen=True, slots=True)
class LoginResult:
    user: User
    auth_time: int
    acr: str
    amr: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SecondFactorNeeded:
    """The password was right and the account uses TOTP: the one-time code is the next step."""

    user_id: str
    username: str


@dataclass(frozen=True, slots=True)
class TotpEnrolment:
    secret: str
    uri: str


class UserService:
    def __init__(
        self, db: Database, store: UserStore, settings: Settings, kek: bytes, events: EventWriter
    ) -> None:
        self._db, self._store, self._settings = db, store, settings
        self._kek, self._events = kek, events

    # ------------------------------------------------------------------ administration

    async def add(self, username: str, display_name: str, lei: str, password: str) -> User:
        name, entity = normalise_username(username), check_lei(lei)
        if not display_name.strip() or len(display_name) > 200:
            raise UserError("display name: 1-200 characters")
        try:
            password_hash = passwords.hash_password(password)
        except passwords.WeakPasswordError as exc:
            raise UserError(str(exc)) from None
        now = int(time.time())
        user = User(
            new_user_id(),
            name,
            display_name.strip(),
            entity,
            UserStatus.ACTIVE,
            False,
            created_at=now,
        )
        async with self._db.transaction() as conn:
            if await self._store.get(conn, username=name) is not None:
                raise UserError(f"user {name!r} already exists")
            await self._store.add(conn, user, password_hash, now)
            await self._events(conn, [self._event(AuditEventType.USER_CREATED, user, lei=entity)])
        return user

    async def list(self) -> list[User]:
        async with self._db.read() as conn:
            return await self._store.list(conn)

    async def get(self, username: str) -> User:
        async with self._db.read() as conn:
            user = await self._store.get(conn, username=normalise_username(username))
        if user is None:
            raise UserError(f"no user {username!r}")
        return user

    async def by_id(self, user_id: str) -> User | None:
        async with self._db.read() as conn:
            return await self._store.get(conn, user_id=user_id)

    async def set_status(self, username: str, status: UserStatus) -> User:
        user = await self.get(username)
        await self._update(user, "status", status=status.value, failed_logins=0, locked_until=0)
        return replace(user, status=status)

    async def set_password(self, username: str, password: str) -> None:
        user = await self.get(username)
        try:
            password_hash = passwords.hash_password(password)
        except passwords.WeakPasswordError as exc:
            raise UserError(str(exc)) from None
        await self._update(
            user, "password", password_hash=password_hash, failed_logins=0, locked_until=0
        )

    async def enable_totp(self, username: str) -> TotpEnrolment:
        """A fresh TOTP seed (replacing any earlier one); shown once, stored encrypted."""
        user = await self.get(username)
        secret = totp.new_secret()
        await self._update(
            user, "totp", totp_secret=self._seal(user.user_id, secret), totp_last_step=None
        )
        return TotpEnrolment(secret, totp.provisioning_uri(secret, user.username, "trustplane"))

    async def _update(self, user: User, what: str, **values: object) -> None:
        async with self._db.transaction() as conn:
            await self._store.update(conn, user.user_id, int(time.time()), **values)
            await self._events(conn, [self._event(AuditEventType.USER_UPDATED, user, change=what)])

    # ------------------------------------------------------------------ login

    async def authenticate(self, username: str, password: str, otp: str | None) -> LoginResult:
        """Both steps at once: the password, then (if enrolled) the one-time code."""
        checked = await self.check_password(username, password)
        if isinstance(checked, LoginResult):
            return checked
        return await self.check_one_time_code(checked, otp or "")

    async def check_password(
        self, username: str, password: str
    ) -> LoginResult | SecondFactorNeeded:
        """First step: the password (always verified, also for unknown users, so that every
        failure costs the same). A wrong password fails alike for enrolled and non-enrolled
        users; only after a right one does an enrolled user learn that a code is needed."""
        now = int(time.time())
        try:
            name = normalise_username(username)
        except UserError:
            name = ""
        async with self._db.read() as conn:
            creds = await self._store.credentials(conn, name) if name else None
        password_ok = passwords.verify_password(password, creds.password_hash if creds else None)
        if creds is None:
            raise LoginFailedError("unknown user")
        reason = _refusal(creds.user, now) or (None if password_ok else "password")
        if reason is not None:
            await self._failed(creds.user, now, reason)
            raise LoginFailedError(reason)
        if passwords.needs_rehash(creds.password_hash):
            async with self._db.transaction() as conn:
                await self._store.update(
                    conn, creds.user.user_id, now, password_hash=passwords.hasher().hash(password)
                )
        if creds.totp_secret is not None:
            return SecondFactorNeeded(creds.user.user_id, creds.user.username)
        return await self._succeeded(creds.user, now, None)

    async def check_one_time_code(self, after: SecondFactorNeeded, otp: str) -> LoginResult:
        """Second step, for a user whose password was just checked: the TOTP code, single use.
        A wrong or replayed code counts towards the lockout like a wrong password."""
        now = int(time.time())
        async with self._db.read() as conn:
            creds = await self._store.credentials(conn, after.username)
        if creds is None or creds.user.user_id != after.user_id:
            raise LoginFailedError("unknown user")
        user, step = creds.user, None
        if creds.totp_secret is not None:
            secret = self._open(user.user_id, creds.totp_secret)
            last = creds.totp_last_step or -1
            step = totp.verify(secret, otp.strip(), after_step=last)
        reason = _refusal(user, now) or (None if step is not None else "totp")
        if reason is None:
            try:
                return await self._succeeded(user, now, step)
            except LoginFailedError:
                reason = "totp replay"
        await self._failed(user, now, reason)
        raise LoginFailedError(reason)

    async def _succeeded(self, user: User, now: int, step: int | None) -> LoginResult:
        """Record the login (a TOTP step is accepted once: :class:`LoginFailedError` if another
        login used it first)."""
        async with self._db.transaction() as conn:
            if not await self._store.record_success(conn, user.user_id, now, step):
                raise LoginFailedError("totp replay")
            event = self._event(AuditEventType.USER_LOGIN_SUCCEEDED, user, totp=step is not None)
            await self._events(conn, [event])
        acr, amr = (ACR_MFA, ("pwd", "otp")) if step is not None else (ACR_PASSWORD, ("pwd",))
        return LoginResult(user, now, acr, amr)

    async def _failed(self, user: User, now: int, reason: str) -> None:
        s = self._settings
        async with self._db.transaction() as conn:
            events = [self._event(AuditEventType.USER_LOGIN_FAILED, user, reason=reason)]
            if reason != "locked":  # attempts during a lock do not extend it
                count = await self._store.record_failure(
                    conn, user.user_id, now, s.login_max_failures, s.login_lockout
                )
                if count >= s.login_max_failures:
                    events.append(self._event(AuditEventType.USER_LOCKED, user, failures=count))
            await self._events(conn, events)

    # ------------------------------------------------------------------ helpers

    def _seal(self, user_id: str, secret: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self._kek).encrypt(
            nonce, secret.encode(), b"totp:" + user_id.encode()
        )

    def _open(self, user_id: str, blob: bytes) -> str:
        try:
            return (
                AESGCM(self._kek)
                .decrypt(blob[:12], blob[12:], b"totp:" + user_id.encode())
                .decode()
            )
        except InvalidTag:
            raise UserError("the TOTP seed cannot be decrypted with this KEK") from None

    def _event(self, type_: AuditEventType, user: User, **payload: object) -> AuditEvent:
        return AuditEvent(
            type=type_,
            issuer=self._settings.issuer,
            subject=user.user_id,
            decision="deny" if type_ is AuditEventType.USER_LOGIN_FAILED else None,
            reason=str(payload.get("reason")) if "reason" in payload else None,
            service="trustplane.users",
            payload={"username": user.username, **payload},
        )


def _refusal(user: User, now: int) -> str | None:
    """Why this account may not log in now, whatever the credentials."""
    if not user.active:
        return "disabled"
    if user.locked_until > now:
        return "locked"
    return None
