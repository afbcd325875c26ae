"""A local user as the rest of the server sees it. Secrets (password hash, TOTP seed) stay in the
store; the model says only whether a second factor is enrolled."""

from __future__ import annotations

import secrets
import unicodedata
from dataclasses import dataclass
from enum import StrEnum

from stdnum import lei as stdnum_lei


class UserStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class UserError(ValueError):
    """A user command was refused; the message is meant for the operator."""


def new_user_id() -> str:
    """The stable subject identifier (``sub``): random, never reused, never derived from the name."""
    return "u_" + secrets.token_hex(12)


def normalise_username(username: str) -> str:
    """Usernames compare case-insensitively after NFKC (so look-alike spellings are one account)."""
    name = unicodedata.normalize("NFKC", username).strip().casefold()
    if not 1 <= len(name) <= 128 or any(c.isspace() or not c.isprintable() for c in name):
        raise UserError("username: 1-128 printable characters without spaces")
    return name


def check_lei(lei: str) -> str:
    value = lei.strip().upper()
    if not stdnum_lei.is_valid(value):
        raise UserError(
            f"lei: {lei!r} is not a valid ISO 17442 LEI (length, charset or check digits)"
        )
    return value


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    username: str
    display_name: str
    lei: str
    status: UserStatus
    totp_enabled: bool
    failed_logins: int = 0
    locked_until: int = 0
    created_at: int = 0
    last_login_at: int | None = None

    @property
    def active(self) -> bool:
        return self.status is UserStatus.ACTIVE

    def public(self) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "username": self.username,
            "display_name": self.display_name,
            "lei": self.lei,
            "status": self.status.value,
            "totp": self.totp_enabled,
            "failed_logins": self.failed_logins,
            "locked_until": self.locked_until or None,
            "created_at": self.created_at,
            "last_login_at": self.last_login_at,
        }
