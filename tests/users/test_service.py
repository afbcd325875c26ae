"""Local users on SQLite and PostgreSQL: creation rules, login with password and TOTP, lockout."""

from __future__ import annotations

import time

import pytest

from tests.conftest import LEI
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.users import totp
from trustplane.users.model import UserError, UserStatus
from trustplane.users.passwords import verify_password
from trustplane.users.service import ACR_MFA, ACR_PASSWORD, LoginFailedError

PASSWORD = "correct horse battery staple"


async def test_add_hashes_with_argon2id_and_checks_the_lei(services: Services) -> None:
    users = services.authorization.users
    user = await users.add("Alice", "Alice Trader", LEI, PASSWORD)
    assert user.username == "alice"
    assert user.user_id.startswith("u_")
    from trustplane.users.store import SqlUserStore

    async with services.db.read() as conn:
        creds = await SqlUserStore().credentials(conn, "alice")
    assert creds is not None
    assert creds.password_hash.startswith("$argon2id$")
    assert verify_password(PASSWORD, creds.password_hash)
    with pytest.raises(UserError, match="lei"):
        await users.add("bob", "Bob", "5493001KJTIIGC8Y1R13", PASSWORD)  # wrong check digits
    with pytest.raises(UserError, match="already exists"):
        await users.add("ALICE", "Alice again", LEI, PASSWORD)
    with pytest.raises(UserError, match="at least"):
        await users.add("carol", "Carol", LEI, "short")


async def test_login_with_password(services: Services) -> None:
    users = services.authorization.users
    await users.add("alice", "Alice", LEI, PASSWORD)
    result = await users.authenticate("Alice", PASSWORD, None)
    assert result.acr == ACR_PASSWORD
    assert abs(result.auth_time - time.time()) < 5
    for username, password in (("alice", "wrong password"), ("nobody", PASSWORD)):
        with pytest.raises(LoginFailedError):
            await users.authenticate(username, password, None)
    events = await recent_events(services.db, type_="users:login:failed")
    assert events[0]["reason"] == "password"


async def test_totp_is_required_once_enrolled_and_single_use(services: Services) -> None:
    users = services.authorization.users
    await users.add("alice", "Alice", LEI, PASSWORD)
    enrolment = await users.enable_totp("alice")
    with pytest.raises(LoginFailedError, match="totp"):
        await users.authenticate("alice", PASSWORD, None)
    code = totp.now_code(enrolment.secret)
    assert (await users.authenticate("alice", PASSWORD, code)).acr == ACR_MFA
    with pytest.raises(LoginFailedError, match="totp"):
        await users.authenticate("alice", PASSWORD, code)  # replayed within its 30 s
    assert (await users.get("alice")).totp_enabled


async def test_lockout_after_repeated_failures_then_reset(
    services: Services, settings_factory: object
) -> None:
    users = services.authorization.users
    await users.add("alice", "Alice", LEI, PASSWORD)
    for _ in range(services.settings.login_max_failures):
        with pytest.raises(LoginFailedError):
            await users.authenticate("alice", "wrong password", None)
    locked = await users.get("alice")
    assert locked.locked_until > time.time()
    with pytest.raises(LoginFailedError, match="locked"):  # the right password does not help now
        await users.authenticate("alice", PASSWORD, None)
    assert await recent_events(services.db, type_="users:user:locked")
    await users.set_password("alice", PASSWORD + "!")  # an administrator resets it
    assert (await users.authenticate("alice", PASSWORD + "!", None)).user.failed_logins == 0


async def test_disabled_user_cannot_log_in(services: Services) -> None:
    users = services.authorization.users
    await users.add("alice", "Alice", LEI, PASSWORD)
    await users.set_status("alice", UserStatus.DISABLED)
    with pytest.raises(LoginFailedError, match="disabled"):
        await users.authenticate("alice", PASSWORD, None)
    await users.set_status("alice", UserStatus.ACTIVE)
    assert (await users.authenticate("alice", PASSWORD, None)).user.active
