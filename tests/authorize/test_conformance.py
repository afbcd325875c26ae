"""The authorization endpoint and PAR against the RFCs' own text (RFC 6749 §3.1/§4.1, RFC 7636,
RFC 9101, RFC 9126, RFC 9207), over HTTP on SQLite and PostgreSQL: the rows of the conformance table
in docs/authorization.md that no other module of this directory tests.

Each test names the clause and asserts the exact status and ``error`` code.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.authorize.conftest import Setup
from tests.authorize.flow import REDIRECT_URI, query_of
from tests.authorize.test_code_flow import introspect
from tests.authorize.test_par_jar import error_page, json_error, push, request_object
from trustplane.authorize.pkce import s256
from trustplane.demo.parties import pkce_pair

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: RFC 6749 §4.1.2.1 / §5.2: the characters an ``error_description`` may hold.
DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
#: A scope the client sends: a double quote, a non-ASCII letter, a backslash (all outside the set).
ODD_SCOPE = 'order:create "\u00e9\\x'


def redirected(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI + "?"), location
    return query_of(location)


# --------------------------------------------------------------------------- exact formats


async def test_a_redirect_uri_with_a_trailing_newline_gets_the_error_page(setup: Setup) -> None:
    """RFC 6749 §3.1.2.3 / RFC 9700 §4.1.3 exact comparison (RFC 8252 §7.3 lets only the port of a
    loopback URI vary): ``http://127.0.0.1:<port>/callback`` followed by a newline is another URI,
    and an unregistered redirect URI is an error page, never a redirect (§4.1.2.1). A ``$`` anchor
    in the loopback pattern matched it and the login page was shown, to be redirected there."""
    for uri in ("http://127.0.0.1:9999/callback\n", "http://127.0.0.1:4711/callback\n"):
        response = await setup.flow().start(redirect_uri=uri)
        assert error_page(response) == (400, None), uri
        assert 'id="error"' in response.text


async def test_a_code_challenge_with_a_trailing_newline_is_invalid_request(setup: Setup) -> None:
    """RFC 7636 §4.2/§4.4.1: an S256 challenge is exactly 43 base64url characters; anything else is
    ``invalid_request``, redirected with ``state`` and ``iss`` (it was accepted, and stored)."""
    flow = setup.flow()
    _verifier, challenge = pkce_pair()
    params = redirected(await flow.start(code_challenge=challenge + "\n"))
    assert params["error"] == "invalid_request"
    assert (params["state"], params["iss"]) == (flow.state, setup.server.issuer)


async def test_a_dpop_jkt_with_a_trailing_newline_is_invalid_request(setup: Setup) -> None:
    """RFC 9449 §10: ``dpop_jkt`` is a base64url SHA-256 thumbprint (43 characters)."""
    flow = setup.flow()
    params = redirected(await flow.start(dpop_jkt="A" * 43 + "\n"))
    assert params["error"] == "invalid_request"


async def test_a_code_verifier_with_a_trailing_newline_is_invalid_grant(setup: Setup) -> None:
    """RFC 7636 §4.1: the verifier is 43-128 characters of ``[A-Za-z0-9-._~]``; §4.6: a verifier
    that does not qualify is ``invalid_grant``, even when its hash is the challenge (it was 200)."""
    flow = setup.flow()
    odd = "a" * 43 + "\n"
    code = await flow.code("alice", code_challenge=s256(odd))
    refused = await setup.token(flow.redeem_form(code, code_verifier=odd))
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")


# --------------------------------------------------------------------------- error_description


async def test_a_redirected_error_description_stays_in_the_allowed_characters(
    setup: Setup,
) -> None:
    """RFC 6749 §4.1.2.1: ``error_description`` MUST NOT include characters outside %x20-21 /
    %x23-5B / %x5D-7E. The unknown-scope message quotes the scope sent: its double quote, its
    non-ASCII letter and its backslash went back to the client as they were."""
    flow = setup.flow()
    params = redirected(await flow.start(scope=ODD_SCOPE))
    assert params["error"] == "invalid_scope"
    assert DESCRIPTION.fullmatch(params["error_description"]), params["error_description"]
    assert params["state"] == flow.state


async def test_a_par_error_description_stays_in_the_allowed_characters(setup: Setup) -> None:
    """RFC 6749 §5.2 (RFC 9126 §2.3 uses its error response): the same rule for the JSON body. The
    request object's ``typ`` header is quoted by the refusal."""
    kit = setup.kit
    flow = setup.flow()
    signed = request_object(kit, flow.params(), _headers={"typ": 'a"b\\\u00e9'})
    response = await push(setup.server, kit, {"request": signed})
    assert json_error(response) == (400, "invalid_request_object")
    description = response.json()["error_description"]
    assert DESCRIPTION.fullmatch(description), description
    response = await push(setup.server, kit, flow.params(scope=ODD_SCOPE))
    assert json_error(response) == (400, "invalid_scope")
    assert DESCRIPTION.fullmatch(response.json()["error_description"])


# --------------------------------------------------------------------------- single use


async def test_racing_redemptions_of_one_code_exactly_one_wins_and_is_revoked(
    setup: Setup,
) -> None:
    """RFC 6749 §4.1.2: a code is used once; used more than once, the request MUST be denied and
    the tokens issued from it SHOULD be revoked. Ten concurrent redemptions: exactly one 200, nine
    ``invalid_grant``; the losers are reuse, so the winner's access and refresh tokens end too."""
    flow = setup.flow()
    code = await flow.code("alice")
    form = flow.redeem_form(code)
    responses = await asyncio.gather(*(setup.token(form) for _ in range(10)))
    won = [r for r in responses if r.status_code == 200]
    assert len(won) == 1, [r.status_code for r in responses]
    assert {(r.status_code, r.json()["error"]) for r in responses if r not in won} == {
        (400, "invalid_grant")
    }
    assert (await introspect(setup, won[0].json()["access_token"]))["active"] is False
    refresh = {"grant_type": "refresh_token", "refresh_token": won[0].json()["refresh_token"]}
    refused = await setup.token(refresh)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")


async def test_racing_uses_of_one_request_uri_exactly_one_gets_the_page(setup: Setup) -> None:
    """RFC 9126 §4: a ``request_uri`` is used once. Ten user agents open it at once: one login
    page, nine error pages ``invalid_request_uri``."""
    kit = setup.kit
    pushed = await push(setup.server, kit, setup.flow().params())
    assert pushed.status_code == 201, pushed.text
    query = {"client_id": kit.client_id, "request_uri": pushed.json()["request_uri"]}
    responses = await asyncio.gather(
        *(setup.flow().http.get("/authorize", params=query) for _ in range(10))
    )
    assert sorted(r.status_code for r in responses) == [200] + [400] * 9
    refused = [error_page(r) for r in responses if r.status_code != 200]
    assert set(refused) == {(400, "invalid_request_uri")}
