"""The login step, pluggable: the authorization endpoint asks a :class:`LoginStep` who the resource
owner is and gets an :class:`Identity` back. ``LocalLogin`` checks local users (password, optional
TOTP); a later upstream federated login implements the same protocol (its ``template`` would offer
the upstream provider, its ``authenticate`` would take the upstream callback's fields).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from trustplane.users.service import LoginFailedError, UserService


@dataclass(frozen=True, slots=True)
class Identity:
    """Who logged in, and how: what the session cookie keeps and the tokens carry."""

    user_id: str
    lei: str
    display_name: str
    auth_time: int
    acr: str


class LoginStep(Protocol):
    #: Short name, recorded in audit payloads.
    name: str
    #: The page template that collects this step's fields.
    template: str

    async def authenticate(self, fields: Mapping[str, str]) -> Identity:
        """The identity, or :class:`LoginFailedError` (with a log-only reason)."""
        ...

    async def still_valid(self, identity: Identity) -> Identity | None:
        """Re-check a session's identity before it is used to grant anything (user disabled,
        legal entity changed); None if it may no longer be used."""
        ...


class LocalLogin:
    name = "local"
    template = "login.html"

    def __init__(self, users: UserService) -> None:
        self._users = users

    async def authenticate(self, fields: Mapping[str, str]) -> Identity:
        result = await self._users.authenticate(
            fields.get("username", ""), fields.get("password", ""), fields.get("otp")
        )
        user = result.user
        return Identity(user.user_id, user.lei, user.display_name, result.auth_time, result.acr)

    async def still_valid(self, identity: Identity) -> Identity | None:
        user = await self._users.by_id(identity.user_id)
        if user is None or not user.active:
            return None
        return Identity(user.user_id, user.lei, user.display_name, identity.auth_time, identity.acr)


__all__ = ["Identity", "LocalLogin", "LoginFailedError", "LoginStep"]
