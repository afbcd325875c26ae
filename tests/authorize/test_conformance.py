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

from tests.authorize.conftest import Setup, register_code_client
from tests.authorize.flow import REDIRECT_URI, query_of
from tests.authorize.test_code_flow import introspect
from tests.authorize.test_par_jar import (
    error_page,
    json_error,
    push,
    pushed_count,
    request_object,
)
from tests.conftest import ClientKit
from trustplane.authorize.pkce import s256
from trustplane.demo.parties import pkce_pair

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: RFC 6749 §4.1.2.1 / §5.2: the characters an ``error_description`` may hold.
DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
#: A scope the client sends: a double quote, a non-ASCII letter, a backslash (all outside the set).
ODD_SCOPE = 'order:create "\u00e9\\x'
#: The second redirect URI ``register_code_client`` registers.
LOOPBACK = "http://127.0.0.1:4711/callback"


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


async def test_a_code_raced_by_its_client_and_another_leaves_no_token_active(
    setup: Setup,
) -> None:
    """RFC 6749 §10.5 under a race: the rightful client and another one present a code at once
    (one each, eight codes). The other client's attempt spends the code or, having lost the
    conditional UPDATE to the redemption, revokes what it issued; whichever order they take, no
    token issued from the code stays active and the foreign attempt is ``invalid_grant``."""
    other = await register_code_client(setup.server)
    for _ in range(8):
        flow = setup.flow()
        code = await flow.code("alice")
        form = flow.redeem_form(code)
        rightful, foreign = await asyncio.gather(setup.token(form), setup.token(form, kit=other))
        assert (foreign.status_code, foreign.json()["error"]) == (400, "invalid_grant")
        if rightful.status_code != 200:
            assert rightful.json()["error"] == "invalid_grant", rightful.text
        for answer in [rightful] if rightful.status_code == 200 else []:
            assert (await introspect(setup, answer.json()["access_token"]))["active"] is False
            refresh = {
                "grant_type": "refresh_token",
                "refresh_token": answer.json()["refresh_token"],
            }
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


# --------------------------------------------------------------------------- RFC 6749 §3.1 and §4.1


async def test_a_repeated_parameter_at_par_is_invalid_request_and_stores_nothing(
    setup: Setup,
) -> None:
    """RFC 6749 §3.1: request parameters MUST NOT be included more than once (RFC 9126 §2.1 takes
    the authorization endpoint's parameters as they are)."""
    flow = setup.flow()
    before = await pushed_count(setup.server)
    body = httpx.QueryParams({**flow.params(), **setup.kit.auth()}).add("state", "again")
    response = await setup.server.http.post(
        "/par", content=str(body), headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert json_error(response) == (400, "invalid_request")
    assert await pushed_count(setup.server) == before


async def test_an_empty_parameter_is_treated_as_omitted(setup: Setup) -> None:
    """RFC 6749 §3.1: a parameter sent without a value is treated as omitted: an empty
    ``request_uri`` at /par is not the forbidden parameter (RFC 9126 §2.1), an empty
    ``request`` is no request object, and an empty ``redirect_uri`` at /authorize is absent (two
    are registered, so that is the error page)."""
    flow = setup.flow()
    response = await push(
        setup.server, setup.kit, {**flow.params(), "request_uri": "", "request": ""}
    )
    assert response.status_code == 201, response.text
    page = await setup.flow().start(redirect_uri="")
    assert error_page(page) == (400, None)


async def test_unknown_parameters_are_ignored(setup: Setup) -> None:
    """RFC 6749 §3.1: the authorization server MUST ignore unrecognised request parameters, at
    /authorize and at /par alike."""
    flow = setup.flow()
    page = await flow.start(unknown_parameter="x", nonce="n", display="page")
    assert page.status_code == 200, page.text
    pushed = await push(
        setup.server, setup.kit, {**setup.flow().params(), "unknown_parameter": "x"}
    )
    assert pushed.status_code == 201, pushed.text


async def test_par_refuses_a_body_over_its_cap_with_413(setup: Setup) -> None:
    """RFC 9126 §2.3: 413 Payload Too Large, in the RFC 6749 §5.2 shape."""
    data = {**setup.flow().params(), **setup.kit.auth(), "padding": "x" * 70_000}
    response = await setup.server.http.post("/par", data=data)
    assert (response.status_code, response.json()["error"]) == (413, "invalid_request")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(setup: Setup, method: str) -> None:
    """RFC 9126 §2.3: 405 at /par; RFC 6749 §3.1: GET (and POST) at /authorize, nothing else."""
    for path in ("/par", "/authorize"):
        response = await setup.server.http.request(method, path)
        assert response.status_code == 405, (path, response.text)


async def test_a_post_to_authorize_that_is_not_a_form_gets_the_error_page(setup: Setup) -> None:
    """RFC 6749 §3.1: POST carries application/x-www-form-urlencoded; a JSON body cannot establish
    the client or its redirect URI, so it is an error page, never a redirect."""
    response = await setup.flow().http.post("/authorize", json=setup.flow().params())
    assert error_page(response) == (400, None)


async def test_par_refuses_a_client_without_the_code_grant(setup: Setup) -> None:
    """RFC 6749 §4.1.2.1 ``unauthorized_client``, at /par as the JSON error (RFC 9126 §2.3)."""
    kit = await register_code_client(setup.server, grant_types=["client_credentials"])
    response = await push(setup.server, kit, setup.flow(kit).params())
    assert json_error(response) == (400, "unauthorized_client")


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"code_challenge_method": "s256"}, "the method name is case-sensitive (RFC 7636 §4.3)"),
        ({"code_challenge": "A" * 42 + "="}, "base64url without padding (RFC 7636 §4.2)"),
        ({"code_challenge": "A" * 44}, "an S256 challenge is 43 characters"),
        ({"code_challenge": "A" * 42 + "+"}, "base64url, not base64"),
    ],
)
async def test_malformed_pkce_is_invalid_request_with_state_and_iss(
    setup: Setup, overrides: dict[str, str], why: str
) -> None:
    """RFC 7636 §4.4.1: a challenge the server cannot use is ``invalid_request``, redirected."""
    flow = setup.flow()
    params = redirected(await flow.start(**overrides))
    assert params["error"] == "invalid_request", why
    assert (params["state"], params["iss"]) == (flow.state, setup.server.issuer)


async def test_state_comes_back_exactly_as_sent(setup: Setup) -> None:
    """RFC 6749 §4.1.2: ``state`` is "the exact value received from the client" (spaces,
    reserved characters, non-ASCII, percent signs), with ``iss`` (RFC 9207 §2)."""
    odd = "a b&c=d/\u00e9%41+?#"
    flow = setup.flow()
    page = await flow.start(state=odd)
    assert page.status_code == 200, page.text
    if 'action="/authorize/login"' in page.text:
        page = await flow.login(page, "alice")
    answer = await flow.decide(page)
    params = query_of(answer.headers["location"])
    assert (params["state"], params["iss"]) == (odd, setup.server.issuer)


# --------------------------------------------------------------------------- RFC 9101


async def test_a_verified_request_object_with_a_foreign_redirect_uri_gets_the_error_page(
    setup: Setup,
) -> None:
    """RFC 6749 §4.1.2.1 with RFC 9101 §6.3: the object verified, but its redirect URI is not the
    client's: an error page, never a redirect there."""
    kit = setup.kit
    flow = setup.flow()
    signed = request_object(kit, flow.params(redirect_uri="https://attacker.example/cb"))
    response = await flow.http.get(
        "/authorize", params={"client_id": kit.client_id, "request": signed}
    )
    assert error_page(response) == (400, None)


async def test_a_request_object_without_client_id_beside_it_is_invalid_request(
    setup: Setup,
) -> None:
    """RFC 9101 §5: ``client_id`` is sent beside ``request`` (and must match the object's)."""
    flow = setup.flow()
    signed = request_object(setup.kit, flow.params())
    response = await flow.http.get("/authorize", params={"request": signed})
    assert error_page(response) == (400, "invalid_request")


# --------------------------------------------------------------------------- registration changes


async def narrow_registration(setup: Setup, kit: ClientKit, **changes: object) -> None:
    """RFC 7592 §2.2: the client replaces its metadata (here through the service, as its
    management API does); the process's registry is reloaded."""
    clients = setup.server.services.clients
    client = await clients.get(kit.client_id)
    # the operator's grant (register_kit's introspection right) is not the client's to send
    kept = {k: v for k, v in client.metadata.items() if k != "resource_server_for"}
    await clients.update(client, {**kept, "client_id": kit.client_id, **changes})
    await clients.load()


async def test_a_pushed_request_for_a_redirect_uri_since_removed_gets_the_error_page(
    setup: Setup,
) -> None:
    """RFC 9126 §4: a pushed request is validated at /authorize as any other; checks done at the
    push may be skipped only if the registration has not changed in a way that affects them. The
    client removed the redirect URI it pushed for: error page (RFC 6749 §4.1.2.1), no redirect
    there. The request_uri used to lead on to a code sent to the removed URI."""
    kit = await register_code_client(setup.server)
    flow = setup.flow(kit)
    pushed = await push(setup.server, kit, flow.params())
    assert pushed.status_code == 201, pushed.text
    await narrow_registration(setup, kit, redirect_uris=[LOOPBACK])
    query = {"client_id": kit.client_id, "request_uri": pushed.json()["request_uri"]}
    response = await flow.http.get("/authorize", params=query)
    assert error_page(response) == (400, None)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        pytest.param({"redirect_uris": [LOOPBACK]}, None, id="redirect-uri-removed"),
        pytest.param({"scope": "order:cancel"}, "invalid_scope", id="scope-removed"),
        pytest.param(
            {"authorization_details_types": []},
            "invalid_authorization_details",
            id="details-type-removed",
        ),
        pytest.param(
            {"grant_types": ["client_credentials"], "response_types": []},
            "unauthorized_client",
            id="code-grant-removed",
        ),
    ],
)
async def test_a_pending_request_the_registration_no_longer_allows_issues_no_code(
    setup: Setup, changes: dict[str, object], error: str | None
) -> None:
    """The same for a request waiting on the consent page (it rides in the sealed form field):
    approving it after the registration changed issued a code to a removed redirect URI, or a
    code for a grant, scope or details type the client may no longer ask for. Now a removed
    redirect URI is the error page; the rest is the error ``/authorize`` would have redirected
    (with ``state`` and ``iss``); no code either way. The same checks run at /authorize for a
    pushed request (above)."""
    kit = await register_code_client(setup.server)
    flow = setup.flow(kit)
    page = await flow.login(await flow.start(), "alice")
    assert 'action="/authorize/consent"' in page.text, page.text
    await narrow_registration(setup, kit, **changes)
    answer = await flow.decide(page)
    if error is None:
        assert error_page(answer) == (400, None)
        return
    assert answer.status_code == 303, answer.text
    params = query_of(answer.headers["location"])
    assert answer.headers["location"].startswith(REDIRECT_URI + "?")
    assert (params["error"], params["state"], params["iss"]) == (
        error,
        flow.state,
        setup.server.issuer,
    )
    assert "code" not in params


async def test_a_pushed_request_for_a_scope_since_removed_is_redirected_invalid_scope(
    setup: Setup,
) -> None:
    kit = await register_code_client(setup.server)
    flow = setup.flow(kit)
    pushed = await push(setup.server, kit, flow.params())
    assert pushed.status_code == 201, pushed.text
    await narrow_registration(setup, kit, scope="order:cancel")
    query = {"client_id": kit.client_id, "request_uri": pushed.json()["request_uri"]}
    params = redirected(await flow.http.get("/authorize", params=query))
    assert (params["error"], params["state"]) == ("invalid_scope", flow.state)


async def test_a_request_without_authorization_details_still_gets_its_code(setup: Setup) -> None:
    """The re-check at approval leaves a plain scope request alone (no details to re-validate):
    code, state and iss, and the code redeems."""
    flow = setup.flow()
    flow.details = None
    code = await flow.code("alice")
    response = await setup.token(flow.redeem_form(code))
    assert response.status_code == 200, response.text
    assert "authorization_details" not in response.json()


# --------------------------------------------------------------------------- values the store meets


async def test_a_nul_inside_a_request_object_state_is_stored_and_returned(setup: Setup) -> None:
    """A form cannot carry a NUL (refused when parsed: PostgreSQL's text cannot hold it), but a
    request object's JSON can (``\\u0000``). The pushed request is stored as JSON text, so the
    escape is what the store holds; the state comes back exactly (RFC 6749 §4.1.2)."""
    kit = setup.kit
    flow = setup.flow()
    signed = request_object(kit, flow.params(state="s\u0000t"))
    pushed = await push(setup.server, kit, {"request": signed})
    assert pushed.status_code == 201, pushed.text
    query = {"client_id": kit.client_id, "request_uri": pushed.json()["request_uri"]}
    page = await flow.http.get("/authorize", params=query)
    assert page.status_code == 200, page.text
    if 'action="/authorize/login"' in page.text:
        page = await flow.login(page, "alice")
    answer = await flow.decide(page)
    assert query_of(answer.headers["location"])["state"] == "s\u0000t"


async def test_over_long_values_in_a_request_object_are_refused(setup: Setup) -> None:
    """A 10,000-character scope inside the object: 400 ``invalid_scope`` with a bounded
    description; an object over 16 KiB (the JWS parser's cap): ``invalid_request_object``.
    Nothing stored either way."""
    kit = setup.kit
    before = await pushed_count(setup.server)
    signed = request_object(kit, setup.flow().params(scope="x" * 10_000))
    response = await push(setup.server, kit, {"request": signed})
    assert json_error(response) == (400, "invalid_scope")
    assert len(response.json()["error_description"]) <= 200
    signed = request_object(kit, setup.flow().params(scope="x" * 20_000))
    response = await push(setup.server, kit, {"request": signed})
    assert json_error(response) == (400, "invalid_request_object")
    assert await pushed_count(setup.server) == before
