"""client_credentials against a real server, driven by clients we did not write.

Authlib signs the private_key_jwt assertion and makes the token request; PyJWT verifies the access
token using nothing but the JWKS it fetched over HTTP. Authlib is used through its requests
integration (``OAuth2Session``, the same ``OAuth2Client`` core): its httpx integration warns on
import that plain httpx is deprecated in favour of httpx2. A plain httpx walk-through then covers the
life of a dynamically registered client: registration, token, introspection, revocation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from joserfc.jwk import ECKey

from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key
from tests.e2e.conftest import DATABASES, LiveServer, module_server, register_client

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    yield from module_server(request, tmp_path_factory, "e2e")


@pytest.fixture(scope="module")
def client_kit(server: LiveServer) -> ClientKit:
    return register_client(server)


def discover(server: LiveServer) -> dict[str, Any]:
    """RFC 8414 metadata, fetched the way a client would."""
    response = httpx.get(f"{server.base_url}/.well-known/oauth-authorization-server", timeout=10)
    assert response.status_code == 200
    metadata: dict[str, Any] = response.json()
    assert metadata["issuer"] == server.issuer == server.base_url
    return metadata


def authlib_fetch(metadata: dict[str, Any], kit: ClientKit, **claims: Any) -> dict[str, Any]:
    """One client_credentials request made entirely by Authlib (a fresh session each time: Authlib
    writes the generated ``jti`` into the claims dict it was given, so reusing one would replay)."""
    now = int(time.time())
    auth = PrivateKeyJWT(
        metadata["token_endpoint"],
        # Authlib's default exp is an hour away; rfc7523bis caps assertions at five minutes.
        claims={"exp": now + 60, **claims},
        headers={"kid": kit.kid},
        alg="ES256",
    )
    with OAuth2Session(
        kit.client_id,
        ECKey.import_key(kit.pem),
        token_endpoint_auth_method="private_key_jwt",
    ) as session:
        session.register_client_auth_method(auth)
        token: dict[str, Any] = session.fetch_token(
            metadata["token_endpoint"],
            grant_type="client_credentials",
            scope="order:create order:cancel",
            resource=EXECUTION,
        )
    return token


def verify_with_jwks(metadata: dict[str, Any], token: str, audience: str) -> dict[str, Any]:
    """PyJWT, keys from the published JWKS only; returns header and claims."""
    jwks = jwt.PyJWKClient(metadata["jwks_uri"], cache_jwk_set=False, timeout=10)
    signing_key = jwks.get_signing_key_from_jwt(token)
    decoded: dict[str, Any] = jwt.decode_complete(
        token,
        signing_key.key,
        algorithms=metadata["access_token_signing_alg_values_supported"],
        audience=audience,
        issuer=metadata["issuer"],
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )
    return decoded


def test_authlib_private_key_jwt_token_verifies_with_published_jwks(
    server: LiveServer, client_kit: ClientKit
) -> None:
    kit = client_kit
    metadata = discover(server)
    assert "private_key_jwt" in metadata["token_endpoint_auth_methods_supported"]

    token = authlib_fetch(metadata, kit, aud=metadata["issuer"])

    assert token["token_type"] == "Bearer"
    assert token["scope"] == "order:create order:cancel"
    decoded = verify_with_jwks(metadata, token["access_token"], EXECUTION)
    header, claims = decoded["header"], decoded["payload"]
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "ES256"
    assert claims["iss"] == server.issuer
    assert claims["aud"] == EXECUTION
    assert claims["sub"] == claims["client_id"] == kit.client_id
    assert claims["scope"] == "order:create order:cancel"
    assert claims["lei"] == LEI
    assert 0 < claims["exp"] - claims["iat"] <= 900
    assert claims["exp"] > time.time()


def test_authlib_default_audience_is_refused(server: LiveServer, client_kit: ClientKit) -> None:
    """Authlib puts the token endpoint URL in ``aud`` (RFC 7523 allows it); rfc7523bis requires the
    issuer identifier alone, so the server must refuse the assertion as a failed authentication."""
    metadata = discover(server)
    assert metadata["token_endpoint"] != metadata["issuer"]

    with pytest.raises(OAuthError) as refused:
        authlib_fetch(metadata, client_kit)

    assert refused.value.error == "invalid_client"


def test_registration_token_introspection_revocation_walkthrough(server: LiveServer) -> None:
    """What an operator and a client would do with the CLI and curl."""
    created = server.cli_json(
        "registration-token", "create", "--lei", LEI, "--uses", "1", "--description", "e2e"
    )
    assert created["registration_endpoint"] == f"{server.issuer}/register"

    key = new_ec_key()
    metadata = {
        "client_name": "walk-through",
        "lei": LEI,
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
        "jwks": jwks_for(key),
    }
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        registered = http.post(
            "/register",
            json=metadata,
            headers={"Authorization": f"Bearer {created['initial_access_token']}"},
        )
        assert registered.status_code == 201, registered.text
        client = registered.json()
        assert (
            client["registration_client_uri"] == f"{server.issuer}/register/{client['client_id']}"
        )
        kit = ClientKit(client["client_id"], key, server.issuer)

        read = http.get(
            client["registration_client_uri"],
            headers={"Authorization": f"Bearer {client['registration_access_token']}"},
        )
        assert read.status_code == 200
        assert read.json()["client_id"] == kit.client_id

        issued = http.post(
            "/token",
            data={"grant_type": "client_credentials", "scope": "order:create", **kit.auth()},
        )
        assert issued.status_code == 200, issued.text
        assert issued.headers["cache-control"] == "no-store"
        access_token = issued.json()["access_token"]

        active = http.post("/introspect", data={"token": access_token, **kit.auth()})
        assert active.status_code == 200
        body = active.json()
        assert body["active"] is True
        assert body["client_id"] == kit.client_id
        assert body["aud"] == EXECUTION
        assert body["scope"] == "order:create"
        assert body["lei"] == LEI

        revoked = http.post("/revoke", data={"token": access_token, **kit.auth()})
        assert revoked.status_code == 200
        assert revoked.content == b""

        after = http.post("/introspect", data={"token": access_token, **kit.auth()})
        assert after.status_code == 200
        assert after.json() == {"active": False}
