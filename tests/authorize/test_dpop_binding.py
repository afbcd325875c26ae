"""DPoP and the authorization code flow (RFC 9449 §5, §10, §10.1), over HTTP.

* ``dpop_jkt`` at ``/authorize`` binds the code: redeemed only with a proof of that key
  (``invalid_grant`` otherwise), and the access token is bound to it;
* a DPoP proof at ``/par`` does the same with its own key; a ``dpop_jkt`` naming another key is
  ``invalid_dpop_proof``;
* a refresh is bound to the key of the refresh request's proof (every grant binds its token).
Proofs are built with PyJWT (tests/dpop/conftest.py)."""

from __future__ import annotations

from typing import Any

import httpx
import jwt
import pytest

from tests.authorize.conftest import Setup
from tests.authorize.flow import REDIRECT_URI, Flow, query_of
from tests.dpop.conftest import ProofKey

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
