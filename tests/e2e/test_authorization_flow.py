"""The authorization code flow against real ``trustplane serve`` processes, over HTTP:

- a browser-less user agent (httpx, following redirects) logs in and approves on the rendered pages;
  the client's redirect URI is served by a mock transport that records the callback;
- Authlib's OAuth 2.0 client (``OAuth2Session``) drives the code + PKCE (S256) part with private_key_jwt;
- on PostgreSQL, racing redemptions of one code and racing refreshes of one refresh token: exactly
  one token response each.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from joserfc.jwk import ECKey

from tests.authorize.flow import PASSWORD, REDIRECT_URI, TRADE, hidden_fields, pkce_pair, query_of
from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key, require_service
from tests.e2e.conftest import TRUSTPLANE, LiveServer, LiveServers, redeem_code, running_servers

pytestmark = pytest.mark.e2e
USER_LEI = "529900T8BM49AURSDO55"


def add_user(server: LiveServer, username: str) -> dict[str, Any]:
    """``trustplane users add`` with the password on stdin, as a provisioning script would."""
    proc = subprocess.run(
        [
            TRUSTPLANE,
            "users",
            "add",
            username,
            "--lei",
            USER_LEI,
            "--name",
            "Alice Trader",
            "--password-stdin",
            "--json",
        ],
        env=server.env,
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def register_code_client(server: LiveServer) -> ClientKit:
    """Dynamic registration (RFC 7591) with an initial access token from the CLI."""
    token = server.cli_json("registration-token", "create", "--lei", LEI)["initial_access_token"]
    key = new_ec_key()
    metadata = {
        "client_name": "Arranger Order Service",
        "lei": LEI,
        "grant_types": ["authorization_code", "refresh_token"],
        "redirect_uris": [REDIRECT_URI],
        "scope": "order:create order:cancel",
        "allowed_resources": [EXECUTION],
        "authorization_details_types": ["trade_instruction"],
        "jwks": jwks_for(key),
    }
    response = httpx.post(
        f"{server.base_url}/register",
        json=metadata,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ClientKit(response.json()["client_id"], key, server.issuer, pem=pem)


class Callback:
    """The client's redirect URI: records every request the user agent is redirected to."""

    def __init__(self) -> None:
        self.hits: list[httpx.URL] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.hits.append(request.url)
        return httpx.Response(200, text="client callback")


def user_agent(server: LiveServer, callback: Callback) -> httpx.Client:
    return httpx.Client(
        base_url=server.base_url,
        follow_redirects=True,
        timeout=30,
        mounts={"https://client.example": httpx.MockTransport(callback)},
    )


def authorize_url(
    server: LiveServer,
    kit: ClientKit,
    challenge: str,
    state: str,
    details: list[dict[str, Any]] | None = None,
) -> str:
    """The /authorize URL of a PKCE code request for order:create at EXECUTION (+ RAR details)."""
    params = {
        "response_type": "code",
        "client_id": kit.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "order:create",
        "resource": EXECUTION,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    if details is not None:
        params["authorization_details"] = json.dumps(details)
    return str(httpx.URL(f"{server.base_url}/authorize", params=params))


def approve(agent: httpx.Client, authorize_url: str, username: str) -> httpx.Response:
    """Open the authorization URL, post the login form, post the consent form (approve)."""
    login_page = agent.get(authorize_url)
    assert login_page.status_code == 200, login_page.text
    assert 'action="/authorize/login"' in login_page.text
    consent_page = agent.post(
        "/authorize/login",
        data={**hidden_fields(login_page.text), "username": username, "password": PASSWORD},
    )
    assert consent_page.status_code == 200, consent_page.text
    assert [r.status_code for r in consent_page.history] == [303]
    assert 'action="/authorize/consent"' in consent_page.text
    return agent.post(
        "/authorize/consent", data={**hidden_fields(consent_page.text), "decision": "approve"}
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServers]:
    with running_servers(tmp_path_factory.mktemp("authz")) as started:
        yield started


@pytest.fixture(scope="module")
def sqlite_server(servers: LiveServers) -> tuple[LiveServer, ClientKit]:
    server = servers.start()
    add_user(server, "alice")
    return server, register_code_client(server)


def test_browser_flow_end_to_end(sqlite_server: tuple[LiveServer, ClientKit]) -> None:
    server, kit = sqlite_server
    verifier, challenge = pkce_pair()
    callback = Callback()
    with user_agent(server, callback) as agent:
        url = authorize_url(server, kit, challenge, "xyz-state", [TRADE])
        final = approve(agent, url, "alice")
        assert final.status_code == 200
        assert final.text == "client callback"
        assert [r.status_code for r in final.history] == [303]
        cookie = final.history[0].request.headers["cookie"]
        assert "trustplane_session=" in cookie
    assert len(callback.hits) == 1
    returned = query_of(str(callback.hits[0]))
    assert returned["state"] == "xyz-state"
    assert returned["iss"] == server.issuer
    token = redeem_code(server, kit, returned["code"], verifier)
    assert token.status_code == 200, token.text
    body = token.json()
    assert body["authorization_details"] == [TRADE]
    info = httpx.post(
        f"{server.base_url}/introspect",
        data={"token": body["access_token"], **kit.auth()},
        timeout=10,
    ).json()
    assert info["active"] is True
    assert info["mandate"]["version"] == 1
    refreshed = httpx.post(
        f"{server.base_url}/token",
        data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"], **kit.auth()},
        timeout=10,
    )
    assert refreshed.status_code == 200, refreshed.text
    # the code is single-use: a second redemption is refused and kills what the first issued
    again = redeem_code(server, kit, returned["code"], verifier)
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")
    info = httpx.post(
        f"{server.base_url}/introspect",
        data={"token": body["access_token"], **kit.auth()},
        timeout=10,
    ).json()
    assert info == {"active": False}


class FreshPrivateKeyJWT(PrivateKeyJWT):  # type: ignore[misc]
    """Authlib's default assertion lives an hour (we accept at most 300 s) and it stores the jti it
    generates in the shared claims dict (so the second request would replay it): fresh claims each
    time."""

    def sign(self, auth: Any, token_endpoint: str) -> Any:
        self.claims = {"exp": int(time.time()) + 60}
        return super().sign(auth, token_endpoint)


def test_authlib_client_code_flow_with_pkce_and_private_key_jwt(
    sqlite_server: tuple[LiveServer, ClientKit],
) -> None:
    server, kit = sqlite_server
    auth = FreshPrivateKeyJWT(token_endpoint=server.issuer, headers={"kid": kit.kid}, alg="ES256")
    client = OAuth2Session(
        kit.client_id,
        ECKey.import_key(kit.pem),
        scope="order:create",
        redirect_uri=REDIRECT_URI,
        code_challenge_method="S256",
        token_endpoint_auth_method=auth,
    )
    verifier = pkce_pair()[0]
    url, _state = client.create_authorization_url(
        f"{server.base_url}/authorize",
        code_verifier=verifier,
        resource=EXECUTION,
        authorization_details=json.dumps([TRADE]),
    )
    assert "code_challenge_method=S256" in url
    callback = Callback()
    with user_agent(server, callback) as agent:
        approve(agent, url, "alice")
    response_url = str(callback.hits[0])
    assert query_of(response_url)["iss"] == server.issuer
    token = client.fetch_token(
        f"{server.base_url}/token",
        authorization_response=response_url,
        code_verifier=verifier,
    )
    assert token["token_type"] == "Bearer"
    assert token["scope"] == "order:create"
    assert token["refresh_token"]
    refreshed = client.refresh_token(f"{server.base_url}/token")
    assert refreshed["access_token"] != token["access_token"]
    assert urlsplit(response_url).netloc == "client.example"
    client.close()


# --------------------------------------------------------------------------- PostgreSQL races

RACERS = 8


@pytest.fixture(scope="module")
def pg_server(servers: LiveServers, module_pg_url: str) -> tuple[LiveServer, ClientKit]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    server = servers.start(module_pg_url)
    add_user(server, "alice")
    return server, register_code_client(server)


def code_for(server: LiveServer, kit: ClientKit) -> tuple[str, str]:
    verifier, challenge = pkce_pair()
    callback = Callback()
    with user_agent(server, callback) as agent:
        approve(agent, authorize_url(server, kit, challenge, "s"), "alice")
    return query_of(str(callback.hits[0]))["code"], verifier


def race(server: LiveServer, forms: list[dict[str, str]]) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(len(forms)) as pool:
        return list(
            pool.map(
                lambda form: httpx.post(f"{server.base_url}/token", data=form, timeout=30), forms
            )
        )


@pytest.mark.postgres
def test_racing_code_redemptions_get_exactly_one_token(
    pg_server: tuple[LiveServer, ClientKit],
) -> None:
    server, kit = pg_server
    code, verifier = code_for(server, kit)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }
    responses = race(server, [{**form, **kit.auth()} for _ in range(RACERS)])
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [400] * (RACERS - 1)
    assert {r.json()["error"] for r in responses if r.status_code == 400} == {"invalid_grant"}


@pytest.mark.postgres
def test_racing_refreshes_get_exactly_one_token(pg_server: tuple[LiveServer, ClientKit]) -> None:
    server, kit = pg_server
    code, verifier = code_for(server, kit)
    first = redeem_code(server, kit, code, verifier).json()
    form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    responses = race(server, [{**form, **kit.auth()} for _ in range(RACERS)])
    assert sorted(r.status_code for r in responses) == [200] + [400] * (RACERS - 1)
    assert {r.json()["error"] for r in responses if r.status_code == 400} == {"invalid_grant"}
