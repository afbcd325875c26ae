"""The ``fapi2`` profile (FAPI 2.0 Security Profile, final): in process on SQLite and PostgreSQL.

A fapi2 deployment (``profile = "fapi2"``): the positive code flow (PAR + PKCE S256 +
private_key_jwt, ``iss`` on the response, refresh without rotation), then one row per MUST with its
exact status and error. A default deployment with ``clock_skew = 0``: a client that opted in by
registration (``"profile": "fapi2"``) gets the fapi2 rules, its neighbour does not.

Where the OpenID conformance suite (FAPI 2.0 Security Profile final plan) has a test for the same
rule, its name is in the row's comment (without the ``fapi2-security-profile-final-`` prefix).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.authorize.conftest import USER_LEI, register_code_client
from tests.authorize.flow import PASSWORD, REDIRECT_URI, Flow, query_of
from tests.authorize.test_par_jar import finish, json_error, open_uri, push, request_object
from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key
from tests.dpop.conftest import ProofKey
from tests.protocol_server import (
    DATABASES,
    Server,
    basic,
    register_secret_client,
    running_server,
    store_client,
)
from trustplane.authorize.store import SqlCodeStore
from trustplane.errors import InvalidClientMetadataError

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def fapi2(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(
        request, tmp_path_factory, profile="fapi2", client_auth_methods=("private_key_jwt",)
    ) as server:
        await server.services.authorization.users.add("alice", "Alice", USER_LEI, PASSWORD)
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def default(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    """A default-profile deployment that allows shared secrets and no clock skew at all."""
    async with running_server(request, tmp_path_factory, "sqlite", clock_skew=0) as server:
        await server.services.authorization.users.add("alice", "Alice", USER_LEI, PASSWORD)
        yield server


def flow_of(server: Server, kit: ClientKit) -> Flow:
    agent = httpx.AsyncClient(transport=server.http._transport, base_url=server.issuer)
    return Flow(agent, kit.client_id, EXECUTION)


async def one_uri_client(server: Server, **metadata: Any) -> ClientKit:
    """A code client with exactly one registered redirect URI: without the fapi2 rule a request
    could leave ``redirect_uri`` out (RFC 6749 §3.1.2.3)."""
    return await register_code_client(server, redirect_uris=[REDIRECT_URI], **metadata)


async def code_flow(server: Server, kit: ClientKit) -> tuple[Flow, dict[str, str]]:
    """PAR with plain parameters, /authorize with the request_uri, login, consent."""
    flow = flow_of(server, kit)
    pushed = await push(server, kit, flow.params())
    assert pushed.status_code == 201, pushed.text
    returned = await finish(flow, await open_uri(flow, pushed.json()["request_uri"]))
    return flow, returned


#: The clients' DPoP key: under fapi2 every token is sender-constrained (§5.3.2.1).
PROOF_KEY = ProofKey.generate()


async def token(server: Server, kit: ClientKit, form: dict[str, str]) -> httpx.Response:
    proof = PROOF_KEY.proof(htu=f"{server.issuer}/token")
    return await server.http.post("/token", data={**form, **kit.auth()}, headers={"DPoP": proof})


async def active(server: Server, access_token: str) -> bool:
    response = await server.http.post(
        "/introspect", data={"token": access_token, **server.kit.auth()}
    )
    assert response.status_code == 200, response.text
    return bool(response.json()["active"])


# --------------------------------------------------------------------------- metadata


async def test_discovery_reflects_the_profile(fapi2: Server, default: Server) -> None:
    doc = (await fapi2.http.get("/.well-known/oauth-authorization-server")).json()
    # discovery-end-point-verification
    assert doc["require_pushed_authorization_requests"] is True
    assert doc["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["response_types_supported"] == ["code"]
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert set(doc["request_object_signing_alg_values_supported"]) <= {"PS256", "ES256", "EdDSA"}
    assert set(doc["token_endpoint_auth_signing_alg_values_supported"]) <= {
        "PS256",
        "ES256",
        "EdDSA",
    }
    plain = (await default.http.get("/.well-known/oauth-authorization-server")).json()
    assert plain["require_pushed_authorization_requests"] is False


# --------------------------------------------------------------------------- the positive flow


async def test_code_flow_under_fapi2(fapi2: Server) -> None:
    """happy-flow: PAR + PKCE S256 + private_key_jwt; ``iss`` on the response (§5.3.2.2, RFC
    9207); refresh without rotation (§5.3.2.1 clause 10): the same refresh token works again and
    is not returned; revoking it ends the access tokens issued from it."""
    kit = await one_uri_client(fapi2)
    flow, returned = await code_flow(fapi2, kit)
    assert returned["iss"] == fapi2.issuer
    async with fapi2.services.db.read() as conn:  # §5.3.2.2: codes live at most 60 s
        stored = await SqlCodeStore().get(conn, returned["code"])
    assert stored is not None
    assert stored.expires_at <= int(time.time()) + 60
    first = await token(fapi2, kit, flow.redeem_form(returned["code"]))
    assert first.status_code == 200, first.text
    body = first.json()
    refresh = body["refresh_token"]
    accesses = [body["access_token"]]
    for _ in range(2):  # refresh-token: no rotation, the old one stays valid
        again = await token(fapi2, kit, {"grant_type": "refresh_token", "refresh_token": refresh})
        assert again.status_code == 200, again.text
        assert "refresh_token" not in again.json()
        accesses.append(again.json()["access_token"])
    assert [await active(fapi2, a) for a in accesses] == [True, True, True]
    revoked = await fapi2.http.post("/revoke", data={"token": refresh, **kit.auth()})
    assert revoked.status_code == 200
    after = await token(fapi2, kit, {"grant_type": "refresh_token", "refresh_token": refresh})
    assert (after.status_code, after.json()["error"]) == (400, "invalid_grant")
    assert [await active(fapi2, a) for a in accesses] == [False, False, False]


async def test_error_redirects_carry_iss_under_fapi2(fapi2: Server) -> None:
    """RFC 9207 §2 / §5.3.2.2: the error response carries ``iss`` as well."""
    kit = await one_uri_client(fapi2)
    flow = flow_of(fapi2, kit)
    pushed = await push(fapi2, kit, flow.params())
    page = await open_uri(flow, pushed.json()["request_uri"])
    page = await flow.login(page, "alice")
    answer = await flow.decide(page, "deny")
    assert answer.status_code == 303
    params = query_of(answer.headers["location"])
    assert (params["error"], params["iss"]) == ("access_denied", fapi2.issuer)


async def test_nbf_8_seconds_ahead_is_accepted(fapi2: Server) -> None:
    """par-ensure-jwt-client-assertions-nbf-8-seconds-in-the-future-is-accepted (and the same
    for a request object): §5.3.2.1 clause 14."""
    kit = await one_uri_client(fapi2)
    flow = flow_of(fapi2, kit)
    ahead = int(time.time()) + 8
    response = await fapi2.http.post(
        "/par",
        data={
            "client_id": kit.client_id,
            "request": request_object(kit, flow.params(), nbf=ahead, iat=ahead),
            **kit.auth(nbf=ahead, iat=ahead),
        },
    )
    assert response.status_code == 201, response.text


# --------------------------------------------------------------------------- negative table


def _plain_pkce(p: dict[str, str]) -> dict[str, str]:
    return {**p, "code_challenge_method": "plain"}


def _no_pkce(p: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in p.items() if not k.startswith("code_challenge")}


def _no_method(p: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in p.items() if k != "code_challenge_method"}


def _no_redirect(p: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in p.items() if k != "redirect_uri"}


PAR_ROWS = [
    # (name, change to the pushed parameters, status, error)
    ("par-plain-pkce-rejected", _plain_pkce, 400, "invalid_request"),
    ("par-ensure-pkce-required", _no_pkce, 400, "invalid_request"),
    ("pkce-method-missing-means-plain", _no_method, 400, "invalid_request"),
    # ensure-redirect-uri-in-authorization-request (plain PAR without redirect_uri)
    ("ensure-redirect-uri-in-authorization-request", _no_redirect, 400, "invalid_request"),
    (
        "ensure-response-type-token-fails",
        lambda p: {**p, "response_type": "token"},
        400,
        "unsupported_response_type",
    ),
    (
        "ensure-response-type-code-idtoken-fails",
        lambda p: {**p, "response_type": "code id_token"},
        400,
        "unsupported_response_type",
    ),
]


@pytest.mark.parametrize(
    ("name", "change", "status", "error"), PAR_ROWS, ids=[r[0] for r in PAR_ROWS]
)
async def test_par_refusals(fapi2: Server, name: str, change: Any, status: int, error: str) -> None:
    kit = await one_uri_client(fapi2)
    flow = flow_of(fapi2, kit)
    response = await push(fapi2, kit, change(flow.params()))
    assert json_error(response) == (status, error), response.text


async def test_request_object_without_redirect_uri_fails(fapi2: Server) -> None:
    """ensure-request-object-without-redirect-uri-fails: §5.3.2.2, even with one registered URI."""
    kit = await one_uri_client(fapi2)
    flow = flow_of(fapi2, kit)
    signed = request_object(kit, _no_redirect(flow.params()))
    response = await push(fapi2, kit, {"client_id": kit.client_id, "request": signed})
    assert json_error(response) == (400, "invalid_request")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_client_assertion_over_60_seconds_ahead_fails(fapi2: Server, claim: str) -> None:
    """par-ensure-jwt-client-assertions-nbf-over-60-seconds-in-the-future-fails (§5.3.2.1
    clause 14), at /par and at /token."""
    kit = await one_uri_client(fapi2)
    flow = flow_of(fapi2, kit)

    def ahead() -> dict[str, int]:
        return {claim: over_a_minute_ahead(), "exp": int(time.time()) + 120}

    response = await fapi2.http.post("/par", data={**flow.params(), **kit.auth(**ahead())})
    assert json_error(response) == (401, "invalid_client")
    response = await fapi2.http.post(
        "/token", data={"grant_type": "client_credentials", **kit.auth(**ahead())}
    )
    assert json_error(response) == (401, "invalid_client")


def over_a_minute_ahead() -> int:
    """A whole-second time still more than 60 s ahead when the server reads its clock: the server
    compares with its whole second (``int(time.time())``), which may have ticked once since this
    one was read (``+ 61`` was accepted when it had: exactly 60 s ahead, a CI flake)."""
    return int(time.time()) + 62


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_request_object_over_60_seconds_ahead_fails(fapi2: Server, claim: str) -> None:
    """§5.3.2.1 clause 14 for request objects."""
    kit = await one_uri_client(fapi2)
    flow = flow_of(fapi2, kit)
    signed = request_object(kit, flow.params(), **{claim: over_a_minute_ahead()})
    response = await push(fapi2, kit, {"client_id": kit.client_id, "request": signed})
    assert json_error(response) == (400, "invalid_request_object")


async def test_par_without_client_authentication_fails(fapi2: Server) -> None:
    """§5.3.2.2: pushed authorization requests without client authentication are refused."""
    kit = await one_uri_client(fapi2)
    response = await fapi2.http.post("/par", data=flow_of(fapi2, kit).params())
    assert json_error(response) == (401, "invalid_client")


ALG_ROWS = [
    # (conformance test, signing overrides for PyJWT)
    ("ensure-signed-client-assertion-with-RS256-fails", "RS256"),
    ("hs256-is-never-a-fapi2-algorithm", "HS256"),
]


@pytest.mark.parametrize(("name", "alg"), ALG_ROWS, ids=[r[0] for r in ALG_ROWS])
async def test_client_assertions_outside_fapi2_algorithms_fail(
    fapi2: Server, name: str, alg: str
) -> None:
    """§5.4.1: PS256, ES256, EdDSA only (client assertion at /par)."""
    kit = await one_uri_client(fapi2)
    flow = flow_of(fapi2, kit)
    key: Any = rsa.generate_private_key(65537, 2048) if alg == "RS256" else b"k" * 32
    response = await fapi2.http.post("/par", data={**flow.params(), **kit.auth(_alg=alg, _key=key)})
    assert json_error(response) == (401, "invalid_client")


@pytest.mark.parametrize("alg", ["RS256", "none"])
async def test_request_objects_outside_fapi2_algorithms_fail(fapi2: Server, alg: str) -> None:
    """ensure-request-object-signature-algorithm-is-not-none, and RS256 (§5.4.1)."""
    kit = await one_uri_client(fapi2)
    flow = flow_of(fapi2, kit)
    key: Any = rsa.generate_private_key(65537, 2048) if alg == "RS256" else None
    signed = request_object(kit, flow.params(), _alg=alg, _key=key)
    response = await push(fapi2, kit, {"client_id": kit.client_id, "request": signed})
    assert json_error(response) == (400, "invalid_request_object")


async def test_authorization_requests_without_par_fail(fapi2: Server) -> None:
    """ensure-unsigned-authorization-request-without-using-par-fails (§5.3.2.2): plain parameters
    and a request object at /authorize, neither pushed, are refused at the redirect URI."""
    kit = await one_uri_client(fapi2)
    flow = flow_of(fapi2, kit)
    plain = await flow.start()
    assert plain.status_code == 302
    assert plain.headers["location"].startswith(REDIRECT_URI + "?")
    refused = query_of(plain.headers["location"])
    assert (refused["error"], refused["iss"]) == ("invalid_request", fapi2.issuer)
    signed = request_object(kit, flow.params())
    jar = await flow.http.get("/authorize", params={"client_id": kit.client_id, "request": signed})
    assert jar.status_code == 302
    assert query_of(jar.headers["location"])["error"] == "invalid_request"


async def test_registration_cannot_opt_out_or_use_a_secret(fapi2: Server) -> None:
    """A client cannot be made looser than the deployment; §5.3.2.1 at registration."""
    base: dict[str, Any] = {
        "lei": LEI,
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
        "jwks": jwks_for(new_ec_key()),
    }
    clients = fapi2.services.clients
    with pytest.raises(InvalidClientMetadataError, match="cannot opt out"):
        await clients.register({**base, "profile": "default"}, initial_access_token=None)
    with pytest.raises(InvalidClientMetadataError, match="not enabled here"):
        await clients.register(
            {k: v for k, v in base.items() if k != "jwks"}
            | {"token_endpoint_auth_method": "client_secret_basic"},
            initial_access_token=None,
        )
    registered = await clients.register({**base, "profile": "fapi2"}, initial_access_token=None)
    assert registered.client.metadata["profile"] == "fapi2"
    # nor by an RFC 7592 update
    raw = {**registered.client.metadata, "client_id": registered.client.client_id}
    with pytest.raises(InvalidClientMetadataError, match="cannot opt out"):
        await clients.update(registered.client, {**raw, "profile": "default"})
    assert (await clients.update(registered.client, raw)).metadata["profile"] == "fapi2"


async def test_dynamic_registration_refusal_is_invalid_client_metadata(fapi2: Server) -> None:
    """The HTTP answer of the opt-out refusal (RFC 7591 §3.2.2): 400 invalid_client_metadata."""
    initial = await fapi2.services.clients.create_initial_access_token("tests", lei=LEI)
    response = await fapi2.http.post(
        "/register",
        json={
            "lei": LEI,
            "scope": "order:create",
            "allowed_resources": [EXECUTION],
            "jwks": jwks_for(new_ec_key()),
            "profile": "default",
        },
        headers={"Authorization": f"Bearer {initial}"},
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_client_metadata")


# --------------------------------------------------------------------------- opt-in by a client


async def test_a_client_can_opt_into_fapi2_on_a_default_deployment(default: Server) -> None:
    """The fapi2 client must use PAR and gets the 10..60 s window although ``clock_skew`` is 0;
    its default neighbour keeps the deployment's rules."""
    strict = await one_uri_client(default, profile="fapi2")
    loose = await one_uri_client(default)
    ahead = int(time.time()) + 8
    for kit, status in ((strict, 201), (loose, 401)):
        params = flow_of(default, kit).params()
        response = await default.http.post("/par", data={**params, **kit.auth(iat=ahead)})
        assert response.status_code == status, response.text
    assert json_error(response) == (401, "invalid_client")
    # PAR required for the fapi2 client only
    plain = await flow_of(default, strict).start()
    assert query_of(plain.headers["location"])["error"] == "invalid_request"
    other = await flow_of(default, loose).start()
    assert other.status_code == 200, other.text
    # redirect_uri required in its pushed requests, not in its neighbour's
    flow = flow_of(default, strict)
    response = await push(default, strict, _no_redirect(flow.params()))
    assert json_error(response) == (400, "invalid_request")
    response = await push(default, loose, _no_redirect(flow_of(default, loose).params()))
    assert response.status_code == 201, response.text


async def test_a_default_client_still_rotates_its_refresh_token(default: Server) -> None:
    """The default profile is unchanged: every refresh rotates (RFC 9700 §4.14.2)."""
    kit = await one_uri_client(default)
    flow, returned = await code_flow(default, kit)
    first = (await token(default, kit, flow.redeem_form(returned["code"]))).json()
    second = await token(
        default, kit, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert second.status_code == 200, second.text
    assert second.json()["refresh_token"] != first["refresh_token"]


async def test_opted_in_secret_client_is_refused(default: Server) -> None:
    """§5.3.2.1: registration refuses a fapi2 client with a shared secret
    (``invalid_client_metadata``); one that became fapi2 afterwards is ``invalid_client``."""
    with pytest.raises(InvalidClientMetadataError, match="fapi2"):
        await register_secret_client(default.services, profile="fapi2")
    client_id, secret = await register_secret_client(default.services)
    stored = default.services.clients.registry.get(client_id)
    assert stored is not None
    changed = replace(stored, metadata={**stored.metadata, "profile": "fapi2"})
    await store_client(default.services, changed)
    response = await default.http.post(
        "/token",
        data={"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION},
        headers=basic(client_id, secret),
    )
    assert json_error(response) == (401, "invalid_client")
