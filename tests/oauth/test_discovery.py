"""Authorization server metadata (RFC 8414) and the JWKS, over HTTP, for each signing algorithm.

``issuer`` is byte-equal to the configured issuer, every endpoint lives under it, no algorithm list
names ``none`` or an HMAC algorithm, and the JWKS carries public members only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.protocol_server import Server, running_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALLOWED_ALGS = {"ES256", "EdDSA", "PS256"}
#: RFC 7518 §6.2.2, §6.3.2, §6.4.1 and RFC 8037 §2: members that carry private key material.
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
ENDPOINTS = {
    "authorization_endpoint": "/authorize",
    "token_endpoint": "/token",
    "introspection_endpoint": "/introspect",
    "revocation_endpoint": "/revoke",
    "registration_endpoint": "/register",
    "jwks_uri": "/jwks",
}


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=[
        pytest.param(
            (db, alg), id=f"{db}-{alg}", marks=[pytest.mark.postgres] if db != "sqlite" else []
        )
        for db in ("sqlite", "postgresql")
        for alg in ("ES256", "EdDSA", "PS256")
    ],
)
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    database, alg = request.param
    async with running_server(
        request, tmp_path_factory, database, signing_algorithm=alg
    ) as started:
        yield started


async def test_metadata_issuer_is_byte_equal_and_endpoints_are_under_it(server: Server) -> None:
    response = await server.http.get("/.well-known/oauth-authorization-server")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert doc["issuer"] == server.issuer
    assert f'"issuer":"{server.issuer}"'.encode() in response.content  # no re-encoding
    assert {name: doc[name] for name in ENDPOINTS} == {
        name: server.issuer + path for name, path in ENDPOINTS.items()
    }
    assert doc["grant_types_supported"] == [
        "authorization_code",
        "client_credentials",
        "refresh_token",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "urn:ietf:params:oauth:grant-type:token-exchange",
    ]
    assert doc["token_endpoint_auth_methods_supported"] == list(
        server.services.settings.client_auth_methods
    )
    assert doc["access_token_signing_alg_values_supported"] == [
        server.services.settings.signing_algorithm
    ]


async def test_advertised_endpoints_are_served(server: Server) -> None:
    doc = (await server.http.get("/.well-known/oauth-authorization-server")).json()
    assert (await server.http.get(doc["jwks_uri"])).status_code == 200
    for name in ("token_endpoint", "introspection_endpoint", "revocation_endpoint"):
        response = await server.http.post(doc[name], data={})
        assert (response.status_code, response.json()["error"]) in {
            (400, "invalid_request"),
            (401, "invalid_client"),
        }, name
    registration = await server.http.post(doc["registration_endpoint"], json={})
    assert (registration.status_code, registration.json()["error"]) == (401, "invalid_token")


async def test_no_none_or_hmac_algorithm_is_advertised(server: Server) -> None:
    doc = (await server.http.get("/.well-known/oauth-authorization-server")).json()
    lists = {name: values for name, values in doc.items() if name.endswith("_alg_values_supported")}
    assert "token_endpoint_auth_signing_alg_values_supported" in lists
    for name, values in lists.items():
        assert values, name
        assert not [v for v in values if v.lower() == "none" or v.upper().startswith("HS")], name
        assert set(values) <= ALLOWED_ALGS, name


async def test_jwks_has_public_members_only(server: Server) -> None:
    response = await server.http.get("/jwks")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/jwk-set+json"
    keys = response.json()["keys"]
    assert keys
    for key in keys:
        assert not PRIVATE_MEMBERS & key.keys(), key["kid"]
        assert key["alg"] in ALLOWED_ALGS
        assert key["use"] == "sig"
        assert key["kid"]
    assert server.services.settings.signing_algorithm in {key["alg"] for key in keys}
