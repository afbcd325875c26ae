"""A browser-less user agent for the authorization code flow: GET /authorize, post the login and
consent forms the server rendered (hidden fields read from the HTML), and catch the redirect back to
the client. Used by the in-process suites and by the e2e tests against a real server."""

from __future__ import annotations

import html
import re
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson

from trustplane.demo.parties import TRADE, pkce_pair

REDIRECT_URI = "https://client.example/cb"
PASSWORD = "correct horse battery staple"
_INPUT = re.compile(r'<input type="hidden" name="(\w+)" value="([^"]*)">')


def hidden_fields(page: str) -> dict[str, str]:
    """The hidden fields of the page's first form (the one-time-code page has a second one)."""
    first = page.split("</form>", 1)[0]
    return {name: html.unescape(value) for name, value in _INPUT.findall(first)}


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@dataclass
class Flow:
    """One user agent (its own cookie jar) driving one client's requests."""

    http: httpx.AsyncClient
    client_id: str
    resource: str
    redirect_uri: str = REDIRECT_URI
    scope: str = "order:create"
    details: list[dict[str, Any]] | None = field(default_factory=lambda: [TRADE])
    verifier: str = ""
    state: str = ""

    def params(self, **overrides: Any) -> dict[str, str]:
        self.verifier, challenge = pkce_pair()
        self.state = secrets.token_urlsafe(12)
        params: dict[str, Any] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": self.scope,
            "resource": self.resource,
            "state": self.state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if self.details is not None:
            params["authorization_details"] = orjson.dumps(self.details).decode()
        params.update(overrides)
        return {k: v for k, v in params.items() if v is not None}

    async def start(self, **overrides: Any) -> httpx.Response:
        return await self.http.get("/authorize", params=self.params(**overrides))

    async def login(
        self, page: httpx.Response, username: str, password: str = PASSWORD, otp: str | None = None
    ) -> httpx.Response:
        """Post the login form; follow the 303 back to the flow (the consent or login page)."""
        data = {**hidden_fields(page.text), "username": username, "password": password}
        if otp is not None:
            data["otp"] = otp
        posted = await self.http.post("/authorize/login", data=data)
        assert posted.status_code == 303, posted.text
        return await self.http.get(posted.headers["location"])

    async def otp(self, page: httpx.Response, code: str) -> httpx.Response:
        """Post the one-time-code page (the second login step); follow the 303."""
        assert 'name="otp"' in page.text, page.text
        posted = await self.http.post(
            "/authorize/login", data={**hidden_fields(page.text), "otp": code}
        )
        assert posted.status_code == 303, posted.text
        return await self.http.get(posted.headers["location"])

    async def decide(
        self, page: httpx.Response, decision: str = "approve", **fields: Any
    ) -> httpx.Response:
        data = {**hidden_fields(page.text), "decision": decision, **fields}
        return await self.http.post(
            "/authorize/consent", data={k: v for k, v in data.items() if v is not None}
        )

    async def code(self, username: str, **overrides: Any) -> str:
        """The whole front channel: start, log in, approve; return the code."""
        page = await self.start(**overrides)
        assert page.status_code == 200, page.text
        if 'action="/authorize/login"' in page.text:
            page = await self.login(page, username)
        assert 'action="/authorize/consent"' in page.text, page.text
        answer = await self.decide(page)
        assert answer.status_code == 303, answer.text
        params = query_of(answer.headers["location"])
        assert params["state"] == self.state
        return params["code"]

    def redeem_form(self, code: str, **overrides: Any) -> dict[str, str]:
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": self.verifier,
        }
        data.update(overrides)
        return {k: v for k, v in data.items() if v is not None}
