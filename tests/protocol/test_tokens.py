"""``issue_access_token``: a derived token never outlives the token it came from."""

from __future__ import annotations

import time

import jwt
import pytest

from trustplane.app import Services
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _issue(services: Services, **kwargs: int) -> dict[str, int]:
    issued = issue_access_token(
        services.keys.ring,
        issuer=services.settings.issuer,
        subject="alice",
        client_id="c1",
        audience="https://execution.example/api",
        scopes=("order:create",),
        lifetime=300,
        **kwargs,
    )
    claims: dict[str, int] = jwt.decode(issued.token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == issued.expires_in
    return claims


async def test_not_after_caps_exp_and_expires_in(services: Services) -> None:
    # a subject token with 10 s left: the clock may tick between the grant's reading and this one
    not_after = int(time.time()) + 10
    claims = _issue(services, not_after=not_after)
    assert claims["exp"] <= not_after


async def test_without_not_after_the_lifetime_is_whole(services: Services) -> None:
    claims = _issue(services)
    assert claims["exp"] - claims["iat"] == 300
