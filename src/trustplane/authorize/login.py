"""The login step, pluggable: the authorization endpoint asks a :class:`LoginStep` who the resource
owner is and gets an :class:`Identity` back, or a :class:`NextStep` when one more page is needed.
``LocalLogin`` checks local users: the password, then, for users who enrolled an authenticator, the
one-time code on a second page. Enrolment is not revealed before the password is checked: a wrong
password fails alike for every user. A later upstream federated login implements the same protocol
(its ``template`` would offer the upstream provider, its ``authenticate`` would take the upstream
callback's fields).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from trustplane.users.service import LoginFailedError, SecondFactorNeeded, UserService


@dataclass(frozen=True, slots=True)
class Identity:
    """Who logged in, and how: what the session cookie keeps and the tokens carry."""

    user_id: str
    lei: str
    display_name: str
    auth_time: int
    acr: str


@dataclass(frozen=True, slots=True)
class NextStep:
    """The first factor passed; ``template`` collects the next one. ``state`` is kept in the sealed
    session cookie (short-lived) and handed back to :meth:`LoginStep.authenticate` with that page's
    fields."""

    template: str
    state: dict[str, str]


class LoginStep(Protocol):
    #: Short name, recorded in audit payloads.
    name: str
    #: The page template that collects this step's first fields.
    template: str

    async def authenticate(
        self, fields: Mapping[str, str], state: Mapping[str, str] | None = None
    ) -> Identity | NextStep:
        """The identity, the next page, or :class:`LoginFailedError` (with a log-only reason).
        ``state``: what the previous :class:`NextStep` asked to keep, None on the first page."""
        ...

    async def still_valid(self, identity: Identity) -> Identity | None:
        """Re-check a session's identity before it is used to grant anything (user disabled,
        legal entity changed); None if it may no longer be used."""
        ...


class LocalLogin:
    name = "local"
    template = "login.html"
    #: The second page, for users with an authenticator app.
    otp_template = "login_otp.html"

    def __init__(self, users: UserService) -> None:
        self._users = users

    async def authenticate(
        self, fields: Mapping[str, str], state: Mapping[str, str] | None = None
    ) -> Identity | NextStep:
        if state is None:
            checked = await self._users.check_password(
                fields.get("username", ""), fields.get("password", "")
            )
            if isinstance(checked, SecondFactorNeeded):
                kept = {"user_id": checked.user_id, "username": checked.username}
                return NextStep(self.otp_template, kept)
            result = checked
        else:
            after = SecondFactorNeeded(state.get("user_id", ""), state.get("username", ""))
            result = await self._users.check_one_time_code(after, fields.get("otp", ""))
        user = result.user
        return Identity(user.user_id, user.lei, user.display_name, result.auth_time, result.acr)

    async def still_valid(self, identity: Identity) -> Identity | None:
        user = await self._users.by_id(identity.user_id)
        if user is None or not user.active:
            return None
        return Identity(user.user_id, user.lei, user.display_name, identity.auth_time, identity.acr)


__all__ = ["Identity", "LocalLogin", "LoginFailedError", "LoginStep", "NextStep"]
