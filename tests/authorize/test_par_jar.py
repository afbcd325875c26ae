"""Pushed authorization requests (RFC 9126) and request objects (RFC 9101), in process on SQLite and
PostgreSQL: the happy paths, then one row per MUST with its exact status and error code.

Where the OpenID conformance suite (FAPI 2.0 Security Profile plan) has a test for the same rule,
its name is in the row's comment (without the ``fapi2-security-profile-final-`` prefix).

At ``/par`` errors are RFC 6749 §5.2 JSON. At ``/authorize`` a bad ``request_uri`` or a request
object that does not verify is an error page (400, the code shown on the page, no redirect): the
redirect URI is inside what could not be trusted (RFC 6749 §4.1.2.1).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from sqlalchemy import func, select, update

from tests.authorize.conftest import Setup, register_code_client
from tests.authorize.flow import REDIRECT_URI, TRADE, Flow, query_of
from tests.conftest import ClientKit, jwks_for, new_ec_key, sign_jwt
from tests.protocol_server import Server, basic, register_secret_client
from trustplane.authorize.par import REQUEST_URI_PREFIX, pushed_authorization_requests
from trustplane.authorize.store import digest
from trustplane.clients.model import ClientStatus
from trustplane.keys.crypto import public_jwk

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Clients:
    setup: Setup
    other: ClientKit  # a second authorization-code client
    par_only: ClientKit  # registered with require_pushed_authorization_requests
    signed_only: ClientKit  # registered with require_signed_request_object
    pinned: ClientKit  # request_object_signing_alg EdDSA; its ES256 key signs nothing valid
    pinned_ed: ed25519.Ed25519PrivateKey

    @property
    def server(self) -> Server:
        return self.setup.server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clients(setup: Setup) -> AsyncIterator[Clients]:
    server = setup.server
    ed = ed25519.Ed25519PrivateKey.generate()
    ec = new_ec_key()
    jwks = {"keys": [*jwks_for(ec)["keys"], {**public_jwk(ed), "kid": "ed", "alg": "EdDSA"}]}
    pinned = await register_code_client(server, jwks=jwks, request_object_signing_alg="EdDSA")
    pinned.key = ec
    yield Clients(
        setup,
        await register_code_client(server),
        await register_code_client(server, require_pushed_authorization_requests=True),
        await register_code_client(server, require_signed_request_object=True),
        pinned,
        ed,
    )


def request_object(kit: ClientKit, params: dict[str, str], **overrides: Any) -> str:
    """A request object with ``params`` (RAR details as JSON, RFC 9396 §3), signed by ``kit``."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": kit.client_id,
        "aud": kit.issuer,
        "client_id": kit.client_id,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        **params,
    }
    if "authorization_details" in params:
        claims["authorization_details"] = orjson.loads(params["authorization_details"])
    return sign_jwt(claims, kit.key, kit.kid, overrides)


async def push(
    server: Server, kit: ClientKit, form: dict[str, str], headers: dict[str, str] | None = None
) -> httpx.Response:
    data = {**form, **kit.auth()}
    return await server.http.post("/par", data=data, headers=headers)


def json_error(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["cache-control"] == "no-store", response.headers
    return response.status_code, str(response.json()["error"])


def error_page(response: httpx.Response) -> tuple[int, str | None]:
    """(status, the error code the page shows); never a redirect."""
    assert "location" not in response.headers, response.headers
    marker = '<code id="error-code">'
    if marker not in response.text:
        return response.status_code, None
    return response.status_code, response.text.split(marker, 1)[1].split("<", 1)[0]


def redirected_error(response: httpx.Response, flow: Flow) -> str:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI + "?")
    params = query_of(location)
    assert params["state"] == flow.state
    return params["error"]


async def pushed_uri(clients: Clients, kit: ClientKit | None = None, **overrides: Any) -> str:
    kit = kit or clients.setup.kit
    flow = clients.setup.flow(kit)
    response = await push(clients.server, kit, flow.params(**overrides))
    assert response.status_code == 201, response.text
    return str(response.json()["request_uri"])


async def open_uri(flow: Flow, request_uri: str, **extra: str) -> httpx.Response:
    return await flow.http.get(
        "/authorize", params={"client_id": flow.client_id, "request_uri": request_uri, **extra}
    )


async def finish(flow: Flow, page: httpx.Response) -> dict[str, str]:
    """Log in (if asked) and approve; the parameters of the redirect back to the client, whose
    ``state`` is the flow's."""
    params = await finish_raw(flow, page)
    assert params["state"] == flow.state
    return params


async def finish_raw(flow: Flow, page: httpx.Response) -> dict[str, str]:
    """Log in (if asked) and approve; the parameters of the redirect back to the client."""
    assert page.status_code == 200, page.text
    if 'action="/authorize/login"' in page.text:
        page = await flow.login(page, "alice")
    assert 'action="/authorize/consent"' in page.text, page.text
    answer = await flow.decide(page)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"].startswith(REDIRECT_URI + "?")
    return query_of(answer.headers["location"])


async def pushed_count(server: Server) -> int:
    async with server.services.db.read() as conn:
        query = select(func.count()).select_from(pushed_authorization_requests)
        return int((await conn.execute(query)).scalar_one())


# --------------------------------------------------------------------------- happy paths


async def test_par_then_authorize_issues_a_code_for_the_pushed_request(clients: Clients) -> None:
    setup = clients.setup
    flow = setup.flow()
    response = await push(clients.server, setup.kit, flow.params())
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"request_uri", "expires_in"}
    assert body["expires_in"] == 60
    assert body["request_uri"].startswith(REQUEST_URI_PREFIX)
    assert len(body["request_uri"]) == len(REQUEST_URI_PREFIX) + 43
    # RFC 9126 §4 / RFC 9101 §5: only client_id and request_uri are read; the rest is ignored
    page = await open_uri(
        flow,
        body["request_uri"],
        redirect_uri="https://attacker.example/cb",
        scope="order:cancel",
        state="not-the-pushed-state",
    )
    params = await finish(flow, page)
    assert params["state"] == flow.state
    assert params["iss"] == setup.server.issuer
    token = await setup.token(flow.redeem_form(params["code"]))
    assert token.status_code == 200, token.text
    assert token.json()["scope"] == "order:create"
    assert token.json()["authorization_details"] == [TRADE]


async def test_only_the_hash_of_the_handle_is_stored(clients: Clients) -> None:
    request_uri = await pushed_uri(clients)
    handle = request_uri.removeprefix(REQUEST_URI_PREFIX)
    async with clients.server.services.db.read() as conn:
        rows = (await conn.execute(select(pushed_authorization_requests))).all()
    assert all(handle not in repr(tuple(row)) for row in rows)
    assert any(row.handle_hash == digest(handle) for row in rows)


async def test_par_with_a_request_object_uses_only_the_object(clients: Clients) -> None:
    """RFC 9101 §5 / RFC 9126 §3: parameters beside the object never override it.
    (ensure-request-object-with-multiple-aud-succeeds: aud is an array holding the issuer)"""
    setup = clients.setup
    flow = setup.flow()
    signed = request_object(setup.kit, flow.params(), aud=[setup.server.issuer, "https://x"])
    outside = {"request": signed, "scope": "order:cancel", "redirect_uri": "https://evil/cb"}
    response = await push(clients.server, setup.kit, outside)
    assert response.status_code == 201, response.text
    params = await finish(flow, await open_uri(flow, response.json()["request_uri"]))
    token = await setup.token(flow.redeem_form(params["code"]))
    assert token.status_code == 200, token.text
    assert token.json()["scope"] == "order:create"


async def test_state_outside_the_object_is_not_used(clients: Clients) -> None:
    # (state-only-outside-request-object-not-used, ensure-different-state-inside-and-outside-
    # request-object)
    setup = clients.setup
    flow = setup.flow()
    without_state = request_object(setup.kit, flow.params(state=None))
    response = await push(clients.server, setup.kit, {"request": without_state, "state": "out"})
    assert response.status_code == 201, response.text
    answer = await finish_raw(flow, await open_uri(flow, response.json()["request_uri"]))
    assert "state" not in answer
    flow = setup.flow()
    inside = request_object(setup.kit, flow.params())
    response = await push(clients.server, setup.kit, {"request": inside, "state": "out"})
    answer = await finish_raw(flow, await open_uri(flow, response.json()["request_uri"]))
    assert answer["state"] == flow.state


async def test_request_object_nbf_slightly_ahead_is_accepted(clients: Clients) -> None:
    # clock skew (ensure-request-object-with-nbf-8-seconds-in-the-future-is-accepted)
    setup = clients.setup
    flow = setup.flow()
    ahead = int(time.time()) + 8
    signed = request_object(setup.kit, flow.params(), nbf=ahead, iat=ahead)
    response = await push(clients.server, setup.kit, {"request": signed})
    assert response.status_code == 201, response.text


async def test_request_object_at_authorize_runs_the_flow(clients: Clients) -> None:
    setup = clients.setup
    flow = setup.flow()
    signed = request_object(setup.kit, flow.params())
    page = await flow.http.get(
        "/authorize",
        params={"client_id": setup.kit.client_id, "request": signed, "scope": "order:cancel"},
    )
    params = await finish(flow, page)
    token = await setup.token(flow.redeem_form(params["code"]))
    assert token.status_code == 200, token.text
    assert token.json()["scope"] == "order:create"


async def test_request_object_signed_with_the_pinned_algorithm_is_accepted(
    clients: Clients,
) -> None:
    kit = clients.pinned
    flow = clients.setup.flow(kit)
    signed = request_object(
        kit, flow.params(), _key=clients.pinned_ed, _alg="EdDSA", _headers={"kid": "ed"}
    )
    response = await push(clients.server, kit, {"request": signed})
    assert response.status_code == 201, response.text


async def test_par_client_and_signed_client_succeed_the_way_they_must(clients: Clients) -> None:
    par_flow = clients.setup.flow(clients.par_only)
    page = await open_uri(par_flow, await pushed_uri(clients, clients.par_only))
    assert page.status_code == 200, page.text
    kit = clients.signed_only
    flow = clients.setup.flow(kit)
    response = await push(clients.server, kit, {"request": request_object(kit, flow.params())})
    assert response.status_code == 201, response.text


async def test_server_metadata_names_par_and_request_objects(clients: Clients) -> None:
    doc = (await clients.server.http.get("/.well-known/oauth-authorization-server")).json()
    issuer = clients.server.issuer
    assert doc["pushed_authorization_request_endpoint"] == issuer + "/par"
    assert doc["require_pushed_authorization_requests"] is False
    assert doc["request_parameter_supported"] is True
    assert doc["request_uri_parameter_supported"] is False
    assert doc["request_object_signing_alg_values_supported"] == ["ES256", "EdDSA", "PS256"]
    assert doc["require_signed_request_object"] is False


# --------------------------------------------------------------------------- /par refusals

# (id, form changes; a value None drops the parameter, expected status, expected error)
# fmt: off
PAR_REFUSALS: list[Any] = [
    # RFC 9126 §2.1: the request_uri parameter MUST NOT be pushed
    # (par-authorization-request-containing-request_uri-form-param)
    pytest.param({"request_uri": REQUEST_URI_PREFIX + "x" * 43}, 400, "invalid_request", id="request_uri-pushed"),
    # RFC 9126 §2.1: the redirect_uri is checked at PAR (ensure-registered-redirect-uri)
    pytest.param({"redirect_uri": "https://attacker.example/cb"}, 400, "invalid_request", id="redirect-uri-unregistered"),
    pytest.param({"redirect_uri": None}, 400, "invalid_request", id="redirect-uri-missing-two-registered"),
    # RFC 9126 §2.1: validated as /authorize would
    # (ensure-response-type-token-fails)
    pytest.param({"response_type": "token"}, 400, "unsupported_response_type", id="response-type-token"),
    # (ensure-response-type-code-idtoken-fails)
    pytest.param({"response_type": "code id_token"}, 400, "unsupported_response_type", id="response-type-hybrid"),
    pytest.param({"response_type": None}, 400, "invalid_request", id="response-type-missing"),
    # RFC 7636 / FAPI 2.0: PKCE S256 required (par-ensure-pkce-required)
    pytest.param({"code_challenge": None}, 400, "invalid_request", id="pkce-missing"),
    # (par-plain-pkce-rejected)
    pytest.param({"code_challenge_method": "plain"}, 400, "invalid_request", id="pkce-plain"),
    pytest.param({"scope": "settlement:submit"}, 400, "invalid_scope", id="scope-not-allowed"),
    pytest.param({"resource": "https://clearing.example/api"}, 400, "invalid_target", id="resource"),
    pytest.param({"authorization_details": '[{"type": "wire_transfer"}]'}, 400, "invalid_authorization_details", id="rar"),
    pytest.param({"state": "s" * 1025}, 400, "invalid_request", id="state-too-long"),
]
# fmt: on


@pytest.mark.parametrize(("changes", "status", "error"), PAR_REFUSALS)
async def test_par_refusals(
    clients: Clients, changes: dict[str, str | None], status: int, error: str
) -> None:
    flow = clients.setup.flow()
    before = await pushed_count(clients.server)
    response = await push(clients.server, clients.setup.kit, flow.params(**changes))
    assert json_error(response) == (status, error), response.text
    assert await pushed_count(clients.server) == before  # nothing stored


async def test_par_without_client_authentication_is_401(clients: Clients) -> None:
    flow = clients.setup.flow()
    response = await clients.server.http.post("/par", data=flow.params())
    assert json_error(response) == (401, "invalid_client")


async def test_par_with_a_wrong_assertion_is_401(clients: Clients) -> None:
    # (par-test-token-endpoint-url-as-audience-fails: only the issuer is the audience)
    flow = clients.setup.flow()
    kit = clients.setup.kit
    data = {**flow.params(), **kit.auth(aud=clients.server.issuer + "/token")}
    response = await clients.server.http.post("/par", data=data)
    assert json_error(response) == (401, "invalid_client")


async def test_par_consumes_the_assertion_jti(clients: Clients) -> None:
    flow = clients.setup.flow()
    auth = clients.setup.kit.auth()
    first = await clients.server.http.post("/par", data={**flow.params(), **auth})
    assert first.status_code == 201, first.text
    again = await clients.server.http.post("/par", data={**flow.params(), **auth})
    assert json_error(again) == (401, "invalid_client")


async def test_par_client_id_must_be_the_authenticated_client(clients: Clients) -> None:
    """RFC 9126 §2.1: the request's client_id is the authenticated client's. With Basic the
    request names another client: invalid_request; with private_key_jwt the assertion's iss
    is compared by client authentication itself: invalid_client."""
    server = clients.server
    client_id, secret = await register_secret_client(
        server.services,
        grant_types=["authorization_code"],
        redirect_uris=[REDIRECT_URI],
        authorization_details_types=["trade_instruction"],
    )
    flow = clients.setup.flow()
    named_other = {**flow.params(), "client_id": clients.setup.kit.client_id}
    response = await server.http.post("/par", data=named_other, headers=basic(client_id, secret))
    assert json_error(response) == (400, "invalid_request")
    own = flow.params(client_id=client_id)
    response = await server.http.post("/par", data=own, headers=basic(client_id, secret))
    assert response.status_code == 201, response.text
    data = {**flow.params(client_id=clients.other.client_id), **clients.setup.kit.auth()}
    response = await server.http.post("/par", data=data)
    assert json_error(response) == (401, "invalid_client")


async def test_par_by_get_is_405(clients: Clients) -> None:
    # (par-attempt-invalid-http-method)
    response = await clients.server.http.get("/par")
    assert response.status_code == 405


async def test_par_with_a_json_body_is_invalid_request(clients: Clients) -> None:
    response = await clients.server.http.post("/par", json={"client_id": "x"})
    assert json_error(response) == (400, "invalid_request")


async def test_signed_only_client_must_push_a_request_object(clients: Clients) -> None:
    # RFC 9101 §10.5 (ensure-unsigned-request-at-par-endpoint-fails)
    kit = clients.signed_only
    flow = clients.setup.flow(kit)
    response = await push(clients.server, kit, flow.params())
    assert json_error(response) == (400, "invalid_request")


# --------------------------------------------------------------------------- request object refusals


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _unsigned(claims_token: str) -> str:
    """The same claims with ``alg: none`` and no signature."""
    from trustplane.jose.jws import b64url_encode

    payload = claims_token.split(".")[1]
    header = b64url_encode(orjson.dumps({"alg": "none", "typ": "oauth-authz-req+jwt"}))
    return f"{header}.{payload}."


def _times(**offsets: int) -> tuple[str, dict[str, int]]:
    """Claims set to now + offset, computed when the object is made (not at collection)."""
    return ("times", offsets)


# (id, how to change the object) -> always 400 invalid_request_object
# fmt: off
OBJECT_REFUSALS: list[Any] = [
    # RFC 9101 §6.2 / FAPI: `none` refused (ensure-request-object-signature-algorithm-is-not-none)
    pytest.param("alg-none", id="alg-none"),
    # (ensure-signed-request-object-with-RS256-fails)
    pytest.param("alg-rs256", id="alg-rs256"),
    # an HMAC: we hold no shared secret
    pytest.param("alg-hs256", id="alg-hs256"),
    # signed by a key the client did not register (ensure-request-object-with-invalid-signature-fails)
    pytest.param("foreign-key", id="foreign-key"),
    pytest.param("tampered", id="tampered-payload"),
    pytest.param("jwe", id="encrypted-not-supported"),
    pytest.param("garbage", id="not-a-jwt"),
    # exp required (ensure-request-object-without-exp-fails)
    pytest.param({"exp": None}, id="exp-missing"),
    # (ensure-expired-request-object-fails)
    pytest.param(_times(exp=-120, nbf=-300, iat=-300), id="exp-past"),
    # exp at most 60 min after nbf (ensure-request-object-with-exp-over-60-fails; the issue calls it
    # ensure-request-object-with-long-exp-fails)
    pytest.param(_times(exp=3700), id="exp-over-60-min-after-nbf"),
    # nbf required (ensure-request-object-without-nbf-fails)
    pytest.param({"nbf": None}, id="nbf-missing"),
    # nbf at most 60 min in the past (ensure-request-object-with-nbf-over-60-fails)
    pytest.param(_times(nbf=-3700, iat=-3700, exp=-3700 + 3000), id="nbf-over-60-min-ago"),
    pytest.param(_times(nbf=600, exp=900), id="nbf-in-future"),
    pytest.param(_times(iat=600), id="iat-in-future"),
    pytest.param({"exp": "soon"}, id="exp-not-a-number"),
    # aud = issuer (ensure-request-object-with-bad-aud-fails)
    pytest.param({"aud": "https://other.example"}, id="aud-wrong"),
    pytest.param({"aud": None}, id="aud-missing"),
    pytest.param({"aud": "http://127.0.0.1:8000/par"}, id="aud-par-endpoint"),
    # iss = client_id
    pytest.param({"iss": "someone-else"}, id="iss-wrong"),
    pytest.param({"iss": None}, id="iss-missing"),
    # client_id in the object = the client's
    pytest.param({"client_id": "someone-else"}, id="client-id-wrong"),
    pytest.param({"client_id": None}, id="client-id-missing"),
    # RFC 9101 §4 (par-authorization-request-containing-request_uri, signed variant)
    pytest.param({"request_uri": REQUEST_URI_PREFIX + "x" * 43}, id="request-uri-inside"),
    pytest.param({"request": "eyJ.eyJ.sig"}, id="request-inside"),
    # RFC 9101 §10.8: another kind of JWT
    pytest.param({"_headers": {"typ": "at+jwt"}}, id="typ-access-token"),
    pytest.param({"_headers": {"typ": "dpop+jwt"}}, id="typ-dpop"),
    pytest.param({"response_type": 1}, id="parameter-not-a-string"),
    pytest.param({"resource": [1]}, id="resource-not-strings"),
    pytest.param({"jti": ""}, id="jti-empty"),
]
# fmt: on


def bad_object(kit: ClientKit, flow: Flow, how: Any) -> str:
    params = flow.params()
    if isinstance(how, dict):
        return request_object(kit, params, **dict(how))
    if isinstance(how, tuple):
        now = int(time.time())
        return request_object(kit, params, **{k: now + v for k, v in how[1].items()})
    if how == "alg-none":
        return _unsigned(request_object(kit, params))
    if how == "alg-rs256":
        return request_object(kit, params, _key=_rsa_key(), _alg="RS256")
    if how == "alg-hs256":
        return request_object(kit, params, _key=b"k" * 32, _alg="HS256")
    if how == "foreign-key":
        return request_object(kit, params, _key=new_ec_key())
    if how == "tampered":
        header, _payload, signature = request_object(kit, params).split(".")
        other = request_object(kit, {**params, "scope": "order:cancel"}).split(".")[1]
        return f"{header}.{other}.{signature}"
    if how == "jwe":
        return "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d"
    assert how == "garbage"
    return "not a jwt"


@pytest.mark.parametrize("how", OBJECT_REFUSALS)
async def test_request_object_refusals_at_par(clients: Clients, how: Any) -> None:
    kit = clients.setup.kit
    flow = clients.setup.flow()
    before = await pushed_count(clients.server)
    response = await push(clients.server, kit, {"request": bad_object(kit, flow, how)})
    assert json_error(response) == (400, "invalid_request_object"), response.text
    assert await pushed_count(clients.server) == before


@pytest.mark.parametrize("how", OBJECT_REFUSALS)
async def test_request_object_refusals_at_authorize(clients: Clients, how: Any) -> None:
    kit = clients.setup.kit
    flow = clients.setup.flow()
    signed = bad_object(kit, flow, how)
    response = await flow.http.get(
        "/authorize", params={"client_id": kit.client_id, "request": signed}
    )
    assert error_page(response) == (400, "invalid_request_object"), response.text


async def test_request_object_jti_is_single_use(clients: Clients) -> None:
    kit = clients.setup.kit
    flow = clients.setup.flow()
    signed = request_object(kit, flow.params())
    first = await push(clients.server, kit, {"request": signed})
    assert first.status_code == 201, first.text
    again = await push(clients.server, kit, {"request": signed})
    assert json_error(again) == (400, "invalid_request_object")


async def test_request_object_of_another_client_is_refused(clients: Clients) -> None:
    """Signed by client A, sent by client B: iss and client_id are A's, the key is not B's."""
    flow = clients.setup.flow(clients.other)
    signed = request_object(clients.setup.kit, flow.params())
    response = await push(clients.server, clients.other, {"request": signed})
    assert json_error(response) == (400, "invalid_request_object")


async def test_request_object_client_id_must_match_the_query(clients: Clients) -> None:
    """RFC 9101 §5: the object is the setup client's, the query names another one."""
    flow = clients.setup.flow()
    signed = request_object(clients.setup.kit, flow.params())
    response = await flow.http.get(
        "/authorize", params={"client_id": clients.other.client_id, "request": signed}
    )
    assert error_page(response) == (400, "invalid_request_object")


async def test_pinned_algorithm_refuses_another_registered_key(clients: Clients) -> None:
    kit = clients.pinned  # its ES256 key is registered, but request objects must be EdDSA
    flow = clients.setup.flow(kit)
    response = await push(clients.server, kit, {"request": request_object(kit, flow.params())})
    assert json_error(response) == (400, "invalid_request_object")


async def test_request_object_with_a_valid_object_and_bad_parameters_is_redirected(
    clients: Clients,
) -> None:
    """Once the object verified, its redirect URI is the client's: errors go back there."""
    kit = clients.setup.kit
    flow = clients.setup.flow()
    signed = request_object(kit, flow.params(scope="settlement:submit"))
    response = await flow.http.get(
        "/authorize", params={"client_id": kit.client_id, "request": signed}
    )
    assert redirected_error(response, flow) == "invalid_scope"


# --------------------------------------------------------------------------- /authorize with request_uri


async def test_request_uri_is_single_use(clients: Clients) -> None:
    # RFC 9126 §4 (par-attempt-reuse-request_uri)
    flow = clients.setup.flow()
    request_uri = await pushed_uri(clients)
    assert (await open_uri(flow, request_uri)).status_code == 200
    again = await open_uri(clients.setup.flow(), request_uri)
    assert error_page(again) == (400, "invalid_request_uri")


async def test_request_uri_of_another_client_is_refused_and_not_consumed(clients: Clients) -> None:
    # RFC 9126 §4 (par-attempt-to-use-request_uri-for-different-client)
    request_uri = await pushed_uri(clients)
    thief = clients.setup.flow(clients.other)
    assert error_page(await open_uri(thief, request_uri)) == (400, "invalid_request_uri")
    owner = clients.setup.flow()
    assert (await open_uri(owner, request_uri)).status_code == 200


async def test_expired_request_uri_is_refused(clients: Clients) -> None:
    # RFC 9126 §2.2 expires_in (par-attempt-to-use-expired-request_uri)
    request_uri = await pushed_uri(clients)
    handle = request_uri.removeprefix(REQUEST_URI_PREFIX)
    t = pushed_authorization_requests
    async with clients.server.services.db.transaction() as conn:
        await conn.execute(
            update(t).where(t.c.handle_hash == digest(handle)).values(expires_at=int(time.time()))
        )
    response = await open_uri(clients.setup.flow(), request_uri)
    assert error_page(response) == (400, "invalid_request_uri")


async def test_unknown_request_uri_is_refused(clients: Clients) -> None:
    response = await open_uri(clients.setup.flow(), REQUEST_URI_PREFIX + "A" * 43)
    assert error_page(response) == (400, "invalid_request_uri")


async def test_foreign_request_uri_is_refused_and_never_fetched(clients: Clients) -> None:
    """RFC 9126 §4 / RFC 9101 §5.2: a request_uri we did not issue is not dereferenced."""
    hits = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hits
        hits += 1
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        for uri in (
            f"http://127.0.0.1:{port}/request.jwt",
            f"https://127.0.0.1:{port}/request.jwt",
            "urn:ietf:params:oauth:request_uri:short",
            "urn:example:other",
        ):
            response = await open_uri(clients.setup.flow(), uri)
            assert error_page(response) == (400, "invalid_request_uri"), uri
        await asyncio.sleep(0.1)
    finally:
        listener.close()
        await listener.wait_closed()
    assert hits == 0


async def test_request_uri_without_client_id_is_refused(clients: Clients) -> None:
    request_uri = await pushed_uri(clients)
    flow = clients.setup.flow()
    response = await flow.http.get("/authorize", params={"request_uri": request_uri})
    assert error_page(response) == (400, "invalid_request")


async def test_request_uri_and_request_together_are_refused(clients: Clients) -> None:
    kit = clients.setup.kit
    flow = clients.setup.flow()
    signed = request_object(kit, flow.params())
    response = await open_uri(flow, await pushed_uri(clients), request=signed)
    assert error_page(response) == (400, "invalid_request")


async def test_request_uri_of_a_disabled_client_is_refused(clients: Clients) -> None:
    kit = await register_code_client(clients.server)
    request_uri = await pushed_uri(clients, kit)
    await clients.server.services.clients.set_status(kit.client_id, ClientStatus.DISABLED)
    await clients.server.services.clients.load()
    response = await open_uri(clients.setup.flow(kit), request_uri)
    assert error_page(response) == (400, None)  # "the application ... is not known"
    assert "not known" in response.text


# --------------------------------------------------------------------------- per-client requirements


async def test_par_only_client_is_refused_without_par(clients: Clients) -> None:
    # RFC 9126 §6 require_pushed_authorization_requests
    # (ensure-unsigned-authorization-request-without-using-par-fails)
    flow = clients.setup.flow(clients.par_only)
    assert redirected_error(await flow.start(), flow) == "invalid_request"
    signed = request_object(clients.par_only, flow.params())
    response = await flow.http.get(
        "/authorize", params={"client_id": clients.par_only.client_id, "request": signed}
    )
    assert redirected_error(response, flow) == "invalid_request"


async def test_signed_only_client_is_refused_with_plain_parameters(clients: Clients) -> None:
    # RFC 9101 §10.5 require_signed_request_object
    flow = clients.setup.flow(clients.signed_only)
    assert redirected_error(await flow.start(), flow) == "invalid_request"


async def test_signed_only_client_may_send_the_object_to_authorize(clients: Clients) -> None:
    kit = clients.signed_only
    flow = clients.setup.flow(kit)
    response = await flow.http.get(
        "/authorize",
        params={"client_id": kit.client_id, "request": request_object(kit, flow.params())},
    )
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- dependencies down


async def test_replay_cache_down_at_authorize_is_503_not_500(
    clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request object's jti cannot be checked: fail closed with 503 + Retry-After."""
    from trustplane.dependencies import unavailable

    async def down(self: object, issuer: str, jti: str, expires_at: int) -> bool:
        raise unavailable("redis", ConnectionError("refused"))

    kit = clients.setup.kit
    flow = clients.setup.flow()
    signed = request_object(kit, flow.params())
    monkeypatch.setattr(type(clients.server.services.replay), "consume", down)
    response = await flow.http.get(
        "/authorize", params={"client_id": kit.client_id, "request": signed}
    )
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert error_page(response) == (503, "temporarily_unavailable")


async def test_pushed_request_store_down_is_503_at_authorize_and_par(
    clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    from trustplane.authorize.par import SqlPushedRequestStore

    request_uri = await pushed_uri(clients)

    async def down(*_args: object) -> None:
        raise OperationalError("UPDATE", {}, ConnectionError("database went away"))

    monkeypatch.setattr(SqlPushedRequestStore, "consume", down)
    monkeypatch.setattr(SqlPushedRequestStore, "add", down)
    response = await open_uri(clients.setup.flow(), request_uri)
    assert error_page(response) == (503, "temporarily_unavailable")
    assert response.headers["retry-after"]
    flow = clients.setup.flow()
    pushed = await push(clients.server, clients.setup.kit, flow.params())
    assert json_error(pushed) == (503, "temporarily_unavailable")
