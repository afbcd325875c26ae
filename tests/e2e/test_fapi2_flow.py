"""The whole code flow under ``profile = "fapi2"`` against a real ``trustplane serve`` process, with
clients nobody on the team wrote: PyJWT builds the client assertion for PAR, httpx is the user agent
(login and consent on the rendered pages), Authlib's ``OAuth2Session`` redeems the code (PKCE S256,
private_key_jwt). Then a refresh without rotation (FAPI 2.0 Security Profile §5.3.2.1 clause 10).

Conformance-suite counterparts: ``fapi2-security-profile-final-happy-flow``,
``...-ensure-unsigned-authorization-request-without-using-par-fails``, ``...-refresh-token``,
``...-discovery-end-point-verification``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from authlib.integrations.requests_client import OAuth2Session
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey

from tests.authorize.flow import REDIRECT_URI, pkce_pair, query_of
from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key
from tests.dpop.conftest import ProofKey
from tests.e2e.conftest import LiveServer, running_servers
from tests.e2e.test_authorization_flow import (
    Callback,
    FreshPrivateKeyJWT,
    add_user,
    approve,
    user_agent,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_servers(tmp_path_factory.mktemp("fapi2")) as servers:
        started = servers.start(profile="fapi2")
        add_user(started, "alice")
        yield started


def register(server: LiveServer, **extra: Any) -> httpx.Response:
    token = server.cli_json("registration-token", "create", "--lei", LEI)["initial_access_token"]
    body = {
        "client_name": "Arranger Order Service",
        "lei": LEI,
        "grant_types": ["authorization_code", "refresh_token"],
        "redirect_uris": [REDIRECT_URI],
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
        **extra,
    }
    return httpx.post(
        f"{server.base_url}/register",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_fapi2_code_flow_par_pkce_private_key_jwt(server: LiveServer) -> None:
    metadata = httpx.get(f"{server.base_url}/.well-known/oauth-authorization-server").json()
    assert metadata["require_pushed_authorization_requests"] is True
    assert metadata["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True

    # a client cannot opt out of the deployment's profile
    refused = register(server, jwks=jwks_for(new_ec_key()), profile="default")
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_client_metadata")

    key = new_ec_key()
    registered = register(server, jwks=jwks_for(key))
    assert registered.status_code == 201, registered.text
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kit = ClientKit(registered.json()["client_id"], key, server.issuer, pem=pem)

    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": kit.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "order:create",
        "resource": EXECUTION,
        "state": "fapi2-state",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    callback = Callback()
    with user_agent(server, callback) as agent:
        # not pushed: refused at the redirect URI, with iss (RFC 9207)
        plain = agent.get("/authorize", params=params)
        assert plain.status_code == 200  # the mock callback
        pushed = httpx.post(f"{server.base_url}/par", data={**params, **kit.auth()}, timeout=10)
        assert pushed.status_code == 201, pushed.text
        url = httpx.URL(
            f"{server.base_url}/authorize",
            params={"client_id": kit.client_id, "request_uri": pushed.json()["request_uri"]},
        )
        final = approve(agent, str(url), "alice")
        assert final.status_code == 200
    first, second = (query_of(str(hit)) for hit in callback.hits)
    assert (first["error"], first["iss"]) == ("invalid_request", server.issuer)
    assert (second["state"], second["iss"]) == ("fapi2-state", server.issuer)

    proof_key = ProofKey.generate()
    auth = FreshPrivateKeyJWT(token_endpoint=server.issuer, headers={"kid": kit.kid}, alg="ES256")
    client = OAuth2Session(
        kit.client_id,
        ECKey.import_key(kit.pem),
        redirect_uri=REDIRECT_URI,
        token_endpoint_auth_method=auth,
    )
    token = client.fetch_token(
        f"{server.base_url}/token",
        authorization_response=str(callback.hits[1]),
        code_verifier=verifier,
        # FAPI 2.0 §5.3.2.1: sender-constrained tokens only; a DPoP proof built with PyJWT
        headers={"DPoP": proof_key.proof(htu=f"{server.issuer}/token")},
    )
    client.close()
    assert token["scope"] == "order:create"
    assert token["token_type"] == "DPoP"
    refresh = token["refresh_token"]
    for _ in range(2):  # no rotation: the same refresh token again, none returned
        again = httpx.post(
            f"{server.base_url}/token",
            data={"grant_type": "refresh_token", "refresh_token": refresh, **kit.auth()},
            headers={"DPoP": proof_key.proof(htu=f"{server.issuer}/token")},
            timeout=10,
        )
        assert again.status_code == 200, again.text
        assert "refresh_token" not in again.json()
        assert again.json()["token_type"] == "DPoP"
