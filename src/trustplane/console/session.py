"""The console's session: a sealed cookie (``authorize/sealing.py``: HMAC under a key derived from
the KEK, so every process accepts it) holding the session id, the person's user id and the roles
granted at sign-in, for ``session_lifetime`` seconds. ``HttpOnly``, ``SameSite=Strict``, ``Secure``
(and ``__Host-``) when the issuer is https.

Sign-out clears the cookie (and the sign-in session of ``/authorize``); a copy taken before then stays valid until it expires, so the lifetime is
the bound (docs/console.md). The person's account and roles are read again on every request.

The CSRF token is a MAC of the session id (synchroniser token): a form posted from another origin
cannot know it, and a new sign-in (new id) invalidates every old form.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from trustplane.authorize.sealing import Sealer
from trustplane.console.roles import Role

LOGIN_LIFETIME = 600
SESSION = "console-session"
LOGIN = "console-login"


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    user_id: str
    granted: frozenset[Role]
    started: int


class Sessions:
    def __init__(self, issuer: str, sealer: Sealer, lifetime: int) -> None:
        https = urlsplit(issuer).scheme == "https"
        self._secure = https
        self.cookie = "__Host-trustplane_console" if https else "trustplane_console"
        self.login_cookie = (
            "__Host-trustplane_console_login" if https else "trustplane_console_login"
        )
        #: the sign-in session of ``/authorize`` (authorize/http.py): ended with the console's, so
        #: that signing out of the console signs this browser out of this server
        self.login_session = "__Host-trustplane_session" if https else "trustplane_session"
        self._sealer, self.lifetime = sealer, lifetime

    def read(self, request: Request) -> Session | None:
        data = self._sealer.open(SESSION, request.cookies.get(self.cookie))
        if data is None:
            return None
        try:
            granted = frozenset(Role(r) for r in data["roles"])
            return Session(str(data["sid"]), str(data["uid"]), granted, int(data["at"]))
        except (KeyError, ValueError, TypeError):
            return None

    def start(self, response: Response, user_id: str, granted: frozenset[Role], now: int) -> None:
        data = {
            "sid": secrets.token_urlsafe(32),
            "uid": user_id,
            "roles": sorted(r.value for r in granted),
            "at": now,
        }
        self._set(
            response, self.cookie, self._sealer.seal(SESSION, data, self.lifetime), self.lifetime
        )

    def end(self, response: Response) -> None:
        response.delete_cookie(
            self.cookie, path="/", secure=self._secure, httponly=True, samesite="strict"
        )
        response.delete_cookie(
            self.login_session, path="/", secure=self._secure, httponly=True, samesite="lax"
        )

    def csrf(self, session: Session) -> str:
        return self._sealer.csrf_token(f"console:{session.sid}")

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return self._sealer.csrf_ok(f"console:{session.sid}", token)

    # ---------------------------------------------------------------- the sign-in round trip

    def begin_login(self, response: Response, state: str, verifier: str) -> None:
        sealed = self._sealer.seal(LOGIN, {"state": state, "verifier": verifier}, LOGIN_LIFETIME)
        # Lax: the callback arrives as a top-level navigation from /authorize
        self._set(response, self.login_cookie, sealed, LOGIN_LIFETIME, samesite="lax")

    def pending_login(self, request: Request) -> dict[str, Any] | None:
        return self._sealer.open(LOGIN, request.cookies.get(self.login_cookie))

    def end_login(self, response: Response) -> None:
        response.delete_cookie(
            self.login_cookie, path="/", secure=self._secure, httponly=True, samesite="lax"
        )

    def _set(
        self, response: Response, name: str, value: str, max_age: int, samesite: str = "strict"
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self._secure,
            httponly=True,
            samesite=samesite,  # type: ignore[arg-type]
        )
