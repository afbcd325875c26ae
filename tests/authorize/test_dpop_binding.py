"""DPoP and the authorization code flow (RFC 9449 §5, §10, §10.1), over HTTP.

* ``dpop_jkt`` at ``/authorize`` binds the code: redeemed only with a proof of that key
  (``invalid_grant`` otherwise), and the access token is bound to it;
* a DPoP proof at ``/par`` does the same with its own key; a ``dpop_jkt`` naming another key is
  ``invalid_dpop_proof``;
* a refresh is bound to the key of the refresh request's proof (every grant binds its token).
Proofs are built with PyJWT (tests/dpop/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio

from tests.authorize.conftest import USER_LEI, Setup, register_code_client
from tests.authorize.flow import PASSWORD, REDIRECT_URI, Flow, query_of
from tests.authorize.test_par_jar import pushed_count, request_object
from tests.conftest import ClientKit
from tests.dpop.conftest import ProofKey
from tests.protocol_server import running_server

pytestmark = pytest.mark.asyncio(loop_scope="module")


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def proof_for(setup: Setup, key: ProofKey, path: str = "/token") -> dict[str, str]:
    return {"DPoP": key.proof(htu=setup.server.issuer + path)}


async def redeem(
    setup: Setup, flow: Flow, code: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    data = {**flow.redeem_form(code), **setup.kit.auth()}
    return await setup.server.http.post("/token", data=data, headers=headers)


async def code_through_par(flow: Flow, request_uri: str) -> str:
    page = await flow.http.get(
        "/authorize", params={"client_id": flow.client_id, "request_uri": request_uri}
    )
    assert page.status_code == 200, page.text
    if 'action="/authorize/login"' in page.text:
        page = await flow.login(page, "alice")
    answer = await flow.decide(page)
    assert answer.status_code == 303, answer.text
    return query_of(answer.headers["location"])["code"]


async def push(
    setup: Setup, flow: Flow, headers: dict[str, str] | None = None, **params: str
) -> httpx.Response:
    data = {**flow.params(**params), **setup.kit.auth()}
    return await setup.server.http.post("/par", data=data, headers=headers)


# --------------------------------------------------------------------------- dpop_jkt at /authorize


async def test_a_code_bound_by_dpop_jkt_yields_a_bound_token(setup: Setup) -> None:
    # fapi2-security-profile-final-ensure-dpop-auth-code-binding-success
    key = ProofKey.generate()
    flow = setup.flow()
    code = await flow.code("alice", dpop_jkt=key.jkt)
    response = await redeem(setup, flow, code, proof_for(setup, key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP"
    assert claims_of(body["access_token"])["cnf"] == {"jkt": key.jkt}

    # the refresh grant binds what it issues to the refresh request's proof
    fresh = ProofKey.generate()
    refreshed = await setup.server.http.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            **setup.kit.auth(),
        },
        headers=proof_for(setup, fresh),
    )
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["token_type"] == "DPoP"
    assert claims_of(refreshed.json()["access_token"])["cnf"] == {"jkt": fresh.jkt}


@pytest.mark.parametrize("proof", ["none", "other_key"])
async def test_a_bound_code_needs_a_proof_of_its_key(setup: Setup, proof: str) -> None:
    # RFC 9449 §10 (fapi2-security-profile-final-ensure-token-endpoint-fails-with-mismatched-dpop-jkt)
    key = ProofKey.generate()
    flow = setup.flow()
    code = await flow.code("alice", dpop_jkt=key.jkt)
    headers = None if proof == "none" else proof_for(setup, ProofKey.generate())
    response = await redeem(setup, flow, code, headers)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    # the code was not consumed by the refused attempt: the right proof still redeems it
    again = await redeem(setup, flow, code, proof_for(setup, key))
    assert again.status_code == 200, again.text


async def test_a_malformed_dpop_jkt_is_refused(setup: Setup) -> None:
    flow = setup.flow()
    response = await flow.start(dpop_jkt="not a thumbprint")
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI + "?")
    assert query_of(location)["error"] == "invalid_request"


async def test_an_unbound_code_accepts_any_proof_and_none(setup: Setup) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    response = await redeem(setup, flow, code)
    assert response.status_code == 200
    assert response.json()["token_type"] == "Bearer"


# --------------------------------------------------------------------------- DPoP at /par


async def test_a_proof_at_par_binds_the_code_to_its_key(setup: Setup) -> None:
    # fapi2-security-profile-final-ensure-dpopproof-at-par-endpoint-binding-success; the stolen
    # code: fapi2-security-profile-final-ensure-token-endpoint-fails-with-mismatched-dpop-proof-jkt
    key = ProofKey.generate()
    flow = setup.flow()
    pushed = await push(setup, flow, proof_for(setup, key, "/par"))
    assert pushed.status_code == 201, pushed.text
    code = await code_through_par(flow, pushed.json()["request_uri"])
    stolen = await redeem(setup, flow, code, proof_for(setup, ProofKey.generate()))
    assert (stolen.status_code, stolen.json()["error"]) == (400, "invalid_grant")
    response = await redeem(setup, flow, code, proof_for(setup, key))
    assert response.status_code == 200, response.text
    assert claims_of(response.json()["access_token"])["cnf"] == {"jkt": key.jkt}


async def test_par_dpop_jkt_must_match_the_proof(setup: Setup) -> None:
    # RFC 9449 §10.1: dpop_jkt and a DPoP header at PAR must name the same key
    # (fapi2-security-profile-final-ensure-mismatched-dpop-jkt-fails)
    key, other = ProofKey.generate(), ProofKey.generate()
    flow = setup.flow()
    response = await push(setup, flow, proof_for(setup, key, "/par"), dpop_jkt=other.jkt)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_dpop_proof")
    same = await push(setup, flow, proof_for(setup, key, "/par"), dpop_jkt=key.jkt)
    assert same.status_code == 201, same.text


async def push_object(
    setup: Setup, flow: Flow, headers: dict[str, str], **params: str
) -> httpx.Response:
    """A pushed request carried by a request object (RFC 9126 §3), with ``headers`` (DPoP)."""
    signed = request_object(setup.kit, flow.params(**params))
    data = {"request": signed, **setup.kit.auth()}
    return await setup.server.http.post("/par", data=data, headers=headers)


async def test_a_proof_at_par_binds_the_code_of_a_request_object_too(setup: Setup) -> None:
    """RFC 9449 §10.1 with RFC 9126 §3: the pushed request is the request object's, and the proof
    binds it like a plain one. The proof's key was recorded on the outer form, which a request
    object replaces: the code was not bound and was redeemed without any proof."""
    key = ProofKey.generate()
    flow = setup.flow()
    pushed = await push_object(setup, flow, proof_for(setup, key, "/par"))
    assert pushed.status_code == 201, pushed.text
    code = await code_through_par(flow, pushed.json()["request_uri"])
    unproven = await redeem(setup, flow, code)
    assert (unproven.status_code, unproven.json()["error"]) == (400, "invalid_grant")
    stolen = await redeem(setup, flow, code, proof_for(setup, ProofKey.generate()))
    assert (stolen.status_code, stolen.json()["error"]) == (400, "invalid_grant")
    response = await redeem(setup, flow, code, proof_for(setup, key))
    assert response.status_code == 200, response.text
    assert claims_of(response.json()["access_token"])["cnf"] == {"jkt": key.jkt}


async def test_a_request_object_dpop_jkt_must_match_the_proof_at_par(setup: Setup) -> None:
    """RFC 9449 §10.1: ``dpop_jkt`` (here inside the request object) and the proof at PAR must name
    the same key; it was accepted, binding the code to the object's key. A ``dpop_jkt`` beside the
    object is not a parameter of the request (RFC 9101 §5) and is not compared."""
    key, other = ProofKey.generate(), ProofKey.generate()
    flow = setup.flow()
    before = await pushed_count(setup.server)
    response = await push_object(setup, flow, proof_for(setup, key, "/par"), dpop_jkt=other.jkt)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_dpop_proof")
    assert await pushed_count(setup.server) == before
    same = await push_object(setup, flow, proof_for(setup, key, "/par"), dpop_jkt=key.jkt)
    assert same.status_code == 201, same.text


@pytest.mark.parametrize("case", ["htu_token_endpoint", "htm_get", "replayed"])
async def test_an_invalid_proof_at_par_is_refused(setup: Setup, case: str) -> None:
    key = ProofKey.generate()
    url = setup.server.issuer
    if case == "htu_token_endpoint":
        proof = key.proof(htu=url + "/token")
    elif case == "htm_get":
        proof = key.proof(htu=url + "/par", htm="GET")
    else:
        proof = key.proof(htu=url + "/par")
        first = await push(setup, setup.flow(), {"DPoP": proof})
        assert first.status_code == 201, first.text
    response = await push(setup, setup.flow(), {"DPoP": proof})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_dpop_proof")


async def test_a_proof_naming_another_key_than_dpop_jkt_at_par_spends_nothing(setup: Setup) -> None:
    # RFC 9449 §10.1: the refused push must not leave a request_uri behind
    key = ProofKey.generate()
    flow = setup.flow()
    response = await push(setup, flow, proof_for(setup, key, "/par"), dpop_jkt="A" * 43)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_dpop_proof")
    assert "request_uri" not in response.json()


async def test_racing_one_proof_at_par_exactly_one_push_wins(setup: Setup) -> None:
    """RFC 9449 §11.1: 20 pushes carrying one proof, concurrently. The proof ``jti`` is consumed
    once (``used_jtis``' primary key; on SQLite its single writer serialises the inserts just as
    well), so exactly one gets a ``request_uri`` on either store."""
    key = ProofKey.generate()
    headers = proof_for(setup, key, "/par")
    responses = await asyncio.gather(*(push(setup, setup.flow(), headers) for _ in range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 1, statuses
    assert {r.json()["error"] for r in responses if r.status_code != 201} == {"invalid_dpop_proof"}


# --------------------------------------------------------------------------- nonces at /par (§8)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nonced(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Setup]:
    async with running_server(
        request, tmp_path_factory, "sqlite", dpop_nonce_required=True
    ) as server:
        kit = await register_code_client(server)
        user = await server.services.authorization.users.add(
            "alice", "Alice Trader", USER_LEI, PASSWORD
        )
        yield Setup(server, kit, user)


async def test_par_asks_for_a_nonce_then_accepts_it(nonced: Setup) -> None:
    """RFC 9449 §8 at PAR (§10.1): 400 ``use_dpop_nonce`` with exactly one ``DPoP-Nonce`` header
    (not cacheable), then the retry with a new proof carrying that nonce is pushed."""
    key = ProofKey.generate()
    first = await push(nonced, nonced.flow(), proof_for(nonced, key, "/par"))
    assert (first.status_code, first.json()["error"]) == (400, "use_dpop_nonce"), first.text
    assert len(first.headers.get_list("dpop-nonce")) == 1
    assert first.headers["cache-control"] == "no-store"
    nonce = first.headers["dpop-nonce"]
    proof = key.proof(htu=nonced.server.issuer + "/par", nonce=nonce)
    retried = await push(nonced, nonced.flow(), {"DPoP": proof})
    assert retried.status_code == 201, retried.text


async def test_par_refuses_a_foreign_nonce_with_a_fresh_one(nonced: Setup) -> None:
    key = ProofKey.generate()
    proof = key.proof(htu=nonced.server.issuer + "/par", nonce="A" * 32)
    response = await push(nonced, nonced.flow(), {"DPoP": proof})
    assert (response.status_code, response.json()["error"]) == (400, "use_dpop_nonce")
    assert response.headers["dpop-nonce"] != "A" * 32


# --------------------------------------------------------------------------- dpop_bound_access_tokens


async def test_a_dpop_bound_client_needs_a_proof_for_the_code_and_the_refresh(
    setup: Setup,
) -> None:
    """RFC 9449 §5.2: a client registered with ``dpop_bound_access_tokens`` gets no token of any
    grant without a ``DPoP`` header: 400 ``invalid_dpop_proof``; the code and the refresh token
    are not spent by the refused requests."""
    kit = await register_code_client(setup.server, dpop_bound_access_tokens=True)
    key = ProofKey.generate()
    flow = setup.flow(kit)
    code = await flow.code("alice")
    refused = await setup.token(flow.redeem_form(code), kit)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_dpop_proof")
    issued = await redeem_as(setup, kit, flow.redeem_form(code), proof_for(setup, key))
    assert issued.status_code == 200, issued.text
    refresh = {"grant_type": "refresh_token", "refresh_token": issued.json()["refresh_token"]}
    refused = await setup.token(refresh, kit)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_dpop_proof")
    refreshed = await redeem_as(setup, kit, refresh, proof_for(setup, key))
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["token_type"] == "DPoP"


async def redeem_as(
    setup: Setup, kit: ClientKit, form: dict[str, str], headers: dict[str, str]
) -> httpx.Response:
    return await setup.server.http.post("/token", data={**form, **kit.auth()}, headers=headers)
