"""Introspection remembers the signature check of a token it has read (``oauth.exchange.verified``):
a token introspected again is not verified again, and every other check still runs on each request
(revocation, expiry, the token's client, its mandate)."""

from __future__ import annotations

import time
import types

import pytest

from tests.conftest import EXECUTION, LEI
from tests.protocol_server import Server
from trustplane.jose.jws import ParsedJWS
from trustplane.oauth import introspection
from trustplane.protocol import tokens
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture
def verified(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The signing inputs of the signatures verified while the test runs."""
    seen: list[bytes] = []
    verify = ParsedJWS.verify

    def counted(self: ParsedJWS, key: object) -> bool:
        seen.append(self.signing_input)
        return verify(self, key)  # type: ignore[arg-type]

    monkeypatch.setattr(ParsedJWS, "verify", counted)
    return seen


def _signing_input(token: str) -> bytes:
    return token.rsplit(".", 1)[0].encode()


async def _introspect(server: Server, token: str) -> dict[str, object]:
    response = await server.http.post("/introspect", data={"token": token, **server.kit.auth()})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def test_a_token_introspected_again_is_not_verified_again(
    server: Server, verified: list[bytes]
) -> None:
    token = await server.access_token(scope="order:create")
    assert (await _introspect(server, token))["active"] is True
    assert (await _introspect(server, token))["active"] is True
    assert (await _introspect(server, token))["active"] is True
    assert verified.count(_signing_input(token)) == 1


async def test_a_remembered_token_revoked_since_is_inactive(server: Server) -> None:
    token = await server.access_token(scope="order:create")
    assert (await _introspect(server, token))["active"] is True
    revoked = await server.http.post("/revoke", data={"token": token, **server.kit.auth()})
    assert revoked.status_code == 200, revoked.text
    assert await _introspect(server, token) == {"active": False}


async def test_a_remembered_token_past_its_exp_is_inactive(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = issue_access_token(
        server.services.keys.ring, issuer=server.issuer, subject=server.kit.client_id,
        client_id=server.kit.client_id, audience=EXECUTION, scopes=("order:create",),
        lifetime=60, extra={"lei": LEI},
    ).token  # fmt: skip
    assert (await _introspect(server, token))["active"] is True
    later = types.SimpleNamespace(time=lambda: int(time.time()) + 120)
    monkeypatch.setattr(introspection, "time", later)  # the endpoint's clock (and, before the
    monkeypatch.setattr(tokens, "time", later)  # cache, read_access_token's), two minutes on
    assert await _introspect(server, token) == {"active": False}
