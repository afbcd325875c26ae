"""The code flow through PAR (RFC 9126) with a signed request object (RFC 9101) against real
``trustplane serve`` processes, over HTTP, with clients nobody on the team wrote:

- the request object and the client assertion are built with PyJWT; the client's keys are served
  from its ``jwks_uri`` (a loopback HTTP server; ``allow_insecure_loopback_jwks_uri``), so the
  server verifies both through its guarded outbound fetcher;
- the user agent (httpx, following redirects) logs in and approves on the rendered pages;
- Authlib's ``OAuth2Session`` redeems the code (PKCE S256, private_key_jwt);
- on PostgreSQL, one ``request_uri`` opened by eight user agents at once: exactly one gets the
  login page, the others ``invalid_request_uri``.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from authlib.integrations.requests_client import OAuth2Session
from joserfc.jwk import ECKey

from tests.authorize.flow import REDIRECT_URI, TRADE, pkce_pair, query_of
from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key, require_service
from tests.e2e.conftest import LiveServer, LiveServers, running_servers
from tests.e2e.test_authorization_flow import (
    Callback,
    FreshPrivateKeyJWT,
    add_user,
    approve,
    user_agent,
)

pytestmark = pytest.mark.e2e
PREFIX = "urn:ietf:params:oauth:request_uri:"


@dataclass
class JwksHost:
    url: str
    body: bytes = b""
    hits: int = 0


@pytest.fixture(scope="module")
def jwks_host() -> Iterator[JwksHost]:
    """The client's ``jwks_uri``: a loopback HTTP server that counts fetches."""
    host = JwksHost("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host.hits += 1
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(host.body)))
            self.end_headers()
            self.wfile.write(host.body)

        def log_message(self, *_args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host.url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield host
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServers]:
    with running_servers(tmp_path_factory.mktemp("par")) as started:
        yield started


def register(server: LiveServer, key: Any, **metadata: Any) -> ClientKit:
    """Dynamic registration (RFC 7591) of a code client that must use PAR and request objects."""
    token = server.cli_json("registration-token", "create", "--lei", LEI)["initial_access_token"]
    body = {
        "client_name": "Arranger Order Service",
        "lei": LEI,
        "grant_types": ["authorization_code"],
        "redirect_uris": [REDIRECT_URI],
        "scope": "order:create order:cancel",
        "allowed_resources": [EXECUTION],
        "authorization_details_types": ["trade_instruction"],
        "require_pushed_authorization_requests": True,
        "require_signed_request_object": True,
        "request_object_signing_alg": "ES256",
        **metadata,
    }
    response = httpx.post(
        f"{server.base_url}/register",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    registered = response.json()
    assert registered["require_pushed_authorization_requests"] is True
    assert registered["require_signed_request_object"] is True
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ClientKit(registered["client_id"], key, server.issuer, pem=pem)


def signed_request(kit: ClientKit, challenge: str, state: str) -> str:
    """A request object as a client library would build it (PyJWT, RFC 9101 explicit typing)."""
    now = int(time.time())
    claims = {
        "iss": kit.client_id,
        "aud": kit.issuer,
        "client_id": kit.client_id,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "scope": "order:create",
        "resource": EXECUTION,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "authorization_details": [TRADE],
    }
    headers = {"kid": kit.kid, "typ": "oauth-authz-req+jwt"}
    return jwt.encode(claims, kit.key, algorithm="ES256", headers=headers)


def push(server: LiveServer, kit: ClientKit, request_object: str) -> httpx.Response:
    data = {"client_id": kit.client_id, "request": request_object, **kit.auth()}
    return httpx.post(f"{server.base_url}/par", data=data, timeout=10)


def authorize_url(server: LiveServer, kit: ClientKit, request_uri: str) -> str:
    params = {"client_id": kit.client_id, "request_uri": request_uri}
    return str(httpx.URL(f"{server.base_url}/authorize", params=params))


def error_code(page: httpx.Response) -> str:
    return page.text.split('<code id="error-code">', 1)[1].split("<", 1)[0]


def test_code_flow_through_par_with_a_request_object(
    servers: LiveServers, jwks_host: JwksHost
) -> None:
    server = servers.start(allow_insecure_loopback_jwks_uri="true")
    add_user(server, "alice")
    key = new_ec_key()
    jwks_host.body = json.dumps(jwks_for(key)).encode()
    kit = register(server, key, jwks_uri=jwks_host.url)

    metadata = httpx.get(f"{server.base_url}/.well-known/oauth-authorization-server").json()
    assert metadata["pushed_authorization_request_endpoint"] == f"{server.issuer}/par"
    assert "ES256" in metadata["request_object_signing_alg_values_supported"]

    verifier, challenge = pkce_pair()
    pushed = push(server, kit, signed_request(kit, challenge, "e2e-state"))
    assert pushed.status_code == 201, pushed.text
    assert pushed.headers["cache-control"] == "no-store"
    request_uri = pushed.json()["request_uri"]
    assert request_uri.startswith(PREFIX)
    assert pushed.json()["expires_in"] == 60
    assert jwks_host.hits >= 1  # the keys came from the client's jwks_uri

    callback = Callback()
    with user_agent(server, callback) as agent:
        final = approve(agent, authorize_url(server, kit, request_uri), "alice")
        assert final.status_code == 200
        # single use: the same request_uri again is an error page, not a redirect
        again = agent.get(authorize_url(server, kit, request_uri))
        assert again.status_code == 400
        assert not again.history
        assert error_code(again) == "invalid_request_uri"
        # this client must use PAR: plain parameters are refused at its (registered) redirect URI
        plain = agent.get(
            "/authorize",
            params={
                "response_type": "code",
                "client_id": kit.client_id,
                "redirect_uri": REDIRECT_URI,
                "scope": "order:create",
                "resource": EXECUTION,
                "state": "plain",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
        )
        assert plain.status_code == 200  # the mock callback
    assert len(callback.hits) == 2
    returned = query_of(str(callback.hits[0]))
    assert returned["state"] == "e2e-state"
    assert returned["iss"] == server.issuer
    refused = query_of(str(callback.hits[1]))
    assert (refused["error"], refused["state"]) == ("invalid_request", "plain")

    auth = FreshPrivateKeyJWT(token_endpoint=server.issuer, headers={"kid": kit.kid}, alg="ES256")
    client = OAuth2Session(
        kit.client_id,
        ECKey.import_key(kit.pem),
        redirect_uri=REDIRECT_URI,
        token_endpoint_auth_method=auth,
    )
    token = client.fetch_token(
        f"{server.base_url}/token",
        authorization_response=str(callback.hits[0]),
        code_verifier=verifier,
    )
    assert token["token_type"] == "Bearer"
    assert token["scope"] == "order:create"
    assert token["authorization_details"] == [TRADE]
    client.close()


# --------------------------------------------------------------------------- PostgreSQL race

RACERS = 8


@pytest.mark.postgres
def test_racing_uses_of_one_request_uri_get_exactly_one_login_page(
    servers: LiveServers, module_pg_url: str
) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    server = servers.start(module_pg_url)
    key = new_ec_key()
    kit = register(server, key, jwks=jwks_for(key))
    pushed = push(server, kit, signed_request(kit, pkce_pair()[1], "race"))
    assert pushed.status_code == 201, pushed.text
    url = authorize_url(server, kit, pushed.json()["request_uri"])
    barrier = threading.Barrier(RACERS)

    def open_once(_: int) -> httpx.Response:
        with httpx.Client(timeout=30) as agent:  # own connection and cookies per racer
            barrier.wait()
            return agent.get(url)

    with concurrent.futures.ThreadPoolExecutor(RACERS) as pool:
        responses = list(pool.map(open_once, range(RACERS)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [400] * (RACERS - 1)
    winner = next(r for r in responses if r.status_code == 200)
    assert 'action="/authorize/login"' in winner.text
    assert {error_code(r) for r in responses if r.status_code == 400} == {"invalid_request_uri"}
