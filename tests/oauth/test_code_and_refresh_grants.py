"""The authorization_code and refresh_token grants at the token endpoint (RFC 6749 §4.1.3, §6,
RFC 8707 §2.2, RFC 9700 §4.14.2), over HTTP on SQLite and PostgreSQL: what these MUSTs require
beyond the cases in tests/authorize.

- RFC 8707 §2.2: a ``resource`` sent with the code must be the grant's audience (``invalid_target``,
  the code stays usable), never ignored;
- §6: a refresh may narrow the scope; the new refresh token keeps the scope of the one presented
  ("MUST be identical"), so a later refresh without ``scope`` gets the whole grant again;
- rotation is single use: racing refreshes with one token get exactly one answer, and the others
  are the reuse they are indistinguishable from (the family ends);
- a refused refresh consumes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
import pytest_asyncio
from sqlalchemy import update

from tests.authorize.conftest import USER_LEI, Setup, register_code_client
from tests.authorize.flow import PASSWORD
from tests.conftest import CLEARING, EXECUTION
from tests.dpop.conftest import ProofKey
from tests.protocol_server import Server
from trustplane.authorize.store import digest, refresh_tokens

pytestmark = pytest.mark.asyncio(loop_scope="module")

BOTH = "order:create order:cancel"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(server: Server) -> AsyncIterator[Setup]:
    kit = await register_code_client(server)
    user = await server.services.authorization.users.add("bob", "Bob Trader", USER_LEI, PASSWORD)
    yield Setup(server, kit, user)


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


def scope_of(body: dict[str, str]) -> str:
    return str(jwt.decode(body["access_token"], options={"verify_signature": False})["scope"])


async def tokens(setup: Setup, scope: str = "order:create") -> dict[str, str]:
    flow = setup.flow()
    flow.scope = scope
    response = await setup.token(flow.redeem_form(await flow.code("bob")))
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == scope
    return dict(response.json())


def refresh_form(token: str, **extra: str) -> dict[str, str]:
    return {"grant_type": "refresh_token", "refresh_token": token, **extra}


@pytest.mark.parametrize(
    "resource",
    [
        pytest.param(CLEARING, id="another-audience"),
        pytest.param([EXECUTION, CLEARING], id="the-grants-and-another"),
        pytest.param(EXECUTION + "#orders", id="fragment"),
        pytest.param("/api", id="relative"),
    ],
)
async def test_a_code_redeemed_for_another_resource_is_invalid_target(
    setup: Setup, resource: str | list[str]
) -> None:
    """RFC 8707 §2.2: the token request's ``resource`` must be within the grant (here: its one
    audience); 400 invalid_target, and the code is not consumed (it was answered with a token for
    the grant's audience, 200, whatever resource was asked for)."""
    flow = setup.flow()
    code = await flow.code("bob")
    refused = await setup.token({**flow.redeem_form(code), "resource": resource})  # type: ignore[dict-item]
    assert error_of(refused) == (400, "invalid_target"), refused.text
    redeemed = await setup.token({**flow.redeem_form(code), "resource": EXECUTION})
    assert redeemed.status_code == 200, redeemed.text
    claims = jwt.decode(redeemed.json()["access_token"], options={"verify_signature": False})
    assert claims["aud"] == EXECUTION


async def test_a_narrowed_refresh_leaves_the_next_refresh_the_whole_grant(setup: Setup) -> None:
    """RFC 6749 §6: the narrowed request gets a narrower access token; the new refresh token has
    the scope of the one presented, not the narrowed one."""
    first = await tokens(setup, BOTH)
    narrowed = await setup.token(refresh_form(first["refresh_token"], scope="order:cancel"))
    assert narrowed.status_code == 200, narrowed.text
    assert narrowed.json()["scope"] == scope_of(narrowed.json()) == "order:cancel"
    whole = await setup.token(refresh_form(narrowed.json()["refresh_token"]))
    assert whole.status_code == 200, whole.text
    assert whole.json()["scope"] == scope_of(whole.json()) == BOTH


@pytest.mark.parametrize(
    "scope",
    [
        pytest.param("order:create\torder:cancel", id="tab-delimited"),
        pytest.param("order:create\u00a0order:cancel", id="no-break-space-delimited"),
        pytest.param("   ", id="blank"),
        pytest.param("order:create order:teleport", id="wider"),
    ],
)
async def test_a_refused_narrowing_consumes_nothing(setup: Setup, scope: str) -> None:
    """RFC 6749 §3.3 syntax and §6 "MUST NOT include any scope not originally granted": 400
    invalid_scope, and the refresh token is still the live one (no rotation, no family ended)."""
    first = await tokens(setup, BOTH)
    refused = await setup.token(refresh_form(first["refresh_token"], scope=scope))
    assert error_of(refused) == (400, "invalid_scope"), refused.text
    again = await setup.token(refresh_form(first["refresh_token"]))
    assert again.status_code == 200, again.text
    assert again.json()["scope"] == BOTH


async def test_racing_refreshes_with_one_token_exactly_one_wins(setup: Setup) -> None:
    """Rotation (RFC 9700 §4.14.2) is single use: of 8 concurrent refreshes with one token one gets
    tokens, 7 are 400 invalid_grant; the losers are reuse, so the winner's successor is dead too."""
    first = await tokens(setup)
    form = refresh_form(first["refresh_token"])
    responses = await asyncio.gather(*(setup.token(form) for _ in range(8)))
    winners = [r for r in responses if r.status_code == 200]
    assert len(winners) == 1, [r.text for r in responses]
    assert {error_of(r) for r in responses if r.status_code != 200} == {(400, "invalid_grant")}
    successor = await setup.token(refresh_form(winners[0].json()["refresh_token"]))
    assert error_of(successor) == (400, "invalid_grant"), successor.text


async def test_a_replayed_assertion_uses_up_no_refresh_token(setup: Setup) -> None:
    """RFC 7523 §3 item 7: a replayed client assertion is 401 invalid_client, and nothing of the
    request is written: the refresh token it came with is not rotated (it was: the rotation
    committed before the assertion's jti was found used, so the rightful client's next refresh
    was reuse and ended the family)."""
    used = setup.kit.auth()
    spent = await setup.server.http.post(
        "/token", data={**refresh_form((await tokens(setup))["refresh_token"]), **used}
    )
    assert spent.status_code == 200, spent.text
    victim = await tokens(setup)
    replayed = await setup.server.http.post(
        "/token", data={**refresh_form(victim["refresh_token"]), **used}
    )
    assert error_of(replayed) == (401, "invalid_client"), replayed.text
    rightful = await setup.token(refresh_form(victim["refresh_token"]))
    assert rightful.status_code == 200, rightful.text


async def test_a_replayed_assertion_uses_up_no_code(setup: Setup) -> None:
    """The same for a code: refused with the replayed assertion, then redeemed by its client."""
    used = setup.kit.auth()
    first, second = setup.flow(), setup.flow()
    spent_code, victim_code = await first.code("bob"), await second.code("bob")
    spent = await setup.server.http.post("/token", data={**first.redeem_form(spent_code), **used})
    assert spent.status_code == 200, spent.text
    replayed = await setup.server.http.post(
        "/token", data={**second.redeem_form(victim_code), **used}
    )
    assert error_of(replayed) == (401, "invalid_client"), replayed.text
    rightful = await setup.token(second.redeem_form(victim_code))
    assert rightful.status_code == 200, rightful.text


async def test_an_expired_refresh_token_is_invalid_grant(setup: Setup) -> None:
    """RFC 6749 §6 / §5.2: an expired refresh token is 400 invalid_grant (the family's absolute
    expiry, which rotation does not extend)."""
    first = await tokens(setup)
    async with setup.server.services.db.transaction() as conn:
        await conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.token_hash == digest(first["refresh_token"]))
            .values(expires_at=int(time.time()) - 1)
        )
    response = await setup.token(refresh_form(first["refresh_token"]))
    assert error_of(response) == (400, "invalid_grant"), response.text
    assert response.json()["error_description"] == "the refresh token has expired"


async def test_a_replayed_dpop_proof_uses_up_no_refresh_token(setup: Setup) -> None:
    """RFC 9449 §11.1: a replayed proof is 400 invalid_dpop_proof, and (as for a replayed
    assertion) the refresh token it came with is not rotated: its client refreshes next."""
    kit = await register_code_client(setup.server, dpop_bound_access_tokens=True)
    key = ProofKey.generate()
    flow = setup.flow(kit)
    code = await flow.code("bob")
    proof = {"DPoP": key.proof(htu=setup.server.issuer + "/token")}
    issued = await setup.server.http.post(
        "/token", data={**flow.redeem_form(code), **kit.auth()}, headers=proof
    )
    assert issued.status_code == 200, issued.text
    refresh = refresh_form(issued.json()["refresh_token"])
    replayed = await setup.server.http.post("/token", data={**refresh, **kit.auth()}, headers=proof)
    assert error_of(replayed) == (400, "invalid_dpop_proof"), replayed.text
    fresh = {"DPoP": key.proof(htu=setup.server.issuer + "/token")}
    rightful = await setup.server.http.post("/token", data={**refresh, **kit.auth()}, headers=fresh)
    assert rightful.status_code == 200, rightful.text
