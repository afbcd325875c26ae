"""RFC 8705 §2 client authentication at the token and introspection endpoints, over HTTP through the
whole app, with the certificate arriving from a trusted proxy (``tls_client_cert_header``): one row
per MUST, each asserting status and exact error code. The same certificate path over a real TLS
handshake and a real nginx is in ``tests/e2e/test_mtls.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from tests.conftest import EXECUTION, LEI, _Started, jwks_for, make_settings, new_ec_key
from tests.tls.pki import (
    CLIENT_DN,
    CLIENT_DNS,
    CLIENT_EMAIL,
    CLIENT_IP,
    CLIENT_URI,
    Pki,
    build_pki,
    escaped_pem,
    public_jwks,
)
from trustplane.app import Services, create_app
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade
from trustplane.tls.dev_ca import Issued

pytestmark = pytest.mark.asyncio(loop_scope="module")

HEADER = "x-ssl-client-cert"
PROXY = ("127.0.0.1", 40000)
STRANGER_PEER = ("192.0.2.50", 40000)


@dataclass
class Env:
    pki: Pki
    services: Services
    proxy: httpx.AsyncClient  # requests as the trusted proxy forwards them
    direct: httpx.AsyncClient  # requests from a peer that is not a proxy
    ids: dict[str, str]

    async def token(
        self,
        client: str | None,
        cert: Issued | None,
        *,
        via: httpx.AsyncClient | None = None,
        **extra: str,
    ) -> httpx.Response:
        form = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}
        if client is not None:
            form["client_id"] = self.ids.get(client, client)
        form.update(extra)
        headers = {HEADER: escaped_pem(cert)} if cert is not None else {}
        return await (via or self.proxy).post("/token", data=form, headers=headers)


def base_metadata(**extra: Any) -> dict[str, Any]:
    return {
        "lei": LEI,
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
        "introspection_resources": [EXECUTION],
        **extra,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """One app for the module: client authentication reads the in-memory registry, no store."""
    tmp_path = tmp_path_factory.mktemp("mtls")
    pki = build_pki(tmp_path / "pki")
    url = f"sqlite+aiosqlite:///{tmp_path / 'trustplane.db'}"
    db = Database(url)
    await upgrade(db)
    await db.dispose()
    settings = make_settings(
        url,
        tmp_path,
        client_auth_methods=("private_key_jwt", "tls_client_auth", "self_signed_tls_client_auth"),
        tls_client_ca=pki.ca_file,
        tls_client_cert_header=HEADER,
        trusted_proxies=("127.0.0.0/8",),
    )
    services = Services.build(settings)
    await services.start()
    ids: dict[str, str] = {}
    subjects = {
        "dn": ("tls_client_auth_subject_dn", CLIENT_DN),
        "dns": ("tls_client_auth_san_dns", CLIENT_DNS),
        "uri": ("tls_client_auth_san_uri", CLIENT_URI),
        "ip": ("tls_client_auth_san_ip", CLIENT_IP),
        "email": ("tls_client_auth_san_email", CLIENT_EMAIL),
        "other-dn": ("tls_client_auth_subject_dn", "CN=desk-8,O=Acme Trading"),
    }
    for name, (field, value) in subjects.items():
        raw = base_metadata(token_endpoint_auth_method="tls_client_auth", **{field: value})
        ids[name] = (
            await services.clients.register(raw, initial_access_token=None)
        ).client.client_id
    raw = base_metadata(
        token_endpoint_auth_method="self_signed_tls_client_auth",
        jwks=public_jwks(pki.self_signed.key),
        tls_client_certificate_bound_access_tokens=True,
    )
    ids["self"] = (await services.clients.register(raw, initial_access_token=None)).client.client_id
    raw = base_metadata(jwks=jwks_for(new_ec_key()))
    ids["pkjwt"] = (
        await services.clients.register(raw, initial_access_token=None)
    ).client.client_id
    app = create_app(settings, services=_Started(services))  # type: ignore[arg-type]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=PROXY), base_url=settings.issuer
        ) as proxy,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=STRANGER_PEER), base_url=settings.issuer
        ) as direct,
    ):
        yield Env(pki, services, proxy, direct, ids)
    await services.stop()


@pytest.mark.parametrize("client", ["dn", "dns", "uri", "ip", "email"])
async def test_tls_client_auth_with_each_subject_field(env: Env, client: str) -> None:
    response = await env.token(client, env.pki.client)

    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "Bearer"


async def test_self_signed_tls_client_auth(env: Env) -> None:
    response = await env.token("self", env.pki.self_signed)
    assert response.status_code == 200, response.text


TLS, SELF = "tls_client_auth", "self_signed_tls_client_auth"

# (id, client, certificate (attribute of Pki or None), trustplane_certificate_client_auth_total
# labels counted, or None when the request never got to certificate authentication)
# fmt: off
REFUSALS: list[tuple[str, str | None, str | None, tuple[str, str] | None]] = [
    ("no-certificate", "dn", None, (TLS, "no_certificate")),
    ("certificate-from-another-ca-same-subject", "dn", "stranger", (TLS, "chain")),
    ("self-signed-certificate-for-pki-client", "dn", "self_signed", (TLS, "chain")),
    ("server-certificate-of-the-ca", "dn", "server", (TLS, "chain")),
    ("subject-dn-does-not-match", "other-dn", "client", (TLS, "subject")),
    ("self-signed-without-certificate", "self", None, (SELF, "no_certificate")),
    ("self-signed-with-another-key", "self", "client", (SELF, "key")),
    ("self-signed-with-same-subject-other-key", "self", "stranger", (SELF, "key")),
    ("certificate-but-client-uses-private-key-jwt", "pkjwt", "client", None),
    ("unknown-client-id", "tp-nobody", "client", None),
    ("no-client-id", None, "client", None),
]
# fmt: on


def counted(labels: tuple[str, str]) -> float:
    value = REGISTRY.get_sample_value(
        "trustplane_certificate_client_auth_total", {"method": labels[0], "outcome": labels[1]}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("client", "cert", "labels"), [pytest.param(*row[1:], id=row[0]) for row in REFUSALS]
)
async def test_refusals(
    env: Env, client: str | None, cert: str | None, labels: tuple[str, str] | None
) -> None:
    issued = getattr(env.pki, cert) if cert else None
    before = counted(labels) if labels else 0.0
    response = await env.token(client, issued)

    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_client"
    if labels is not None:
        assert counted(labels) == before + 1


async def test_tls_client_using_another_method_is_refused(env: Env) -> None:
    """RFC 6749 §2.3: one method, the registered one; a secret for a tls_client_auth client fails."""
    response = await env.token("dn", env.pki.client, client_secret="guess")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_certificate_header_from_a_non_proxy_is_ignored_and_counted(env: Env) -> None:
    def ignored() -> float:
        value = REGISTRY.get_sample_value(
            "trustplane_client_cert_header_ignored_total", {"reason": "untrusted_peer"}
        )
        return value or 0.0

    before = ignored()
    response = await env.token("dn", env.pki.client, via=env.direct)

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert ignored() == before + 1


async def test_introspection_with_tls_client_auth(env: Env) -> None:
    token = (await env.token("dn", env.pki.client)).json()["access_token"]
    form = {"token": token, "client_id": env.ids["dn"]}
    headers = {HEADER: escaped_pem(env.pki.client)}

    ok = await env.proxy.post("/introspect", data=form, headers=headers)
    refused = await env.proxy.post("/introspect", data=form)

    assert ok.status_code == 200
    assert ok.json()["active"] is True
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"


async def test_discovery_names_the_mtls_members(env: Env) -> None:
    doc = (await env.proxy.get("/.well-known/oauth-authorization-server")).json()
    issuer = env.services.settings.issuer

    assert doc["tls_client_certificate_bound_access_tokens"] is True
    assert doc["mtls_endpoint_aliases"] == {
        "token_endpoint": f"{issuer}/token",
        "introspection_endpoint": f"{issuer}/introspect",
        "revocation_endpoint": f"{issuer}/revoke",
    }
    assert {"tls_client_auth", "self_signed_tls_client_auth"} <= set(
        doc["token_endpoint_auth_methods_supported"]
    )


async def test_registration_stores_the_binding_flag(env: Env) -> None:
    client = env.services.clients.registry.get(env.ids["self"])
    assert client is not None
    assert client.metadata["tls_client_certificate_bound_access_tokens"] is True


async def test_dynamic_registration_of_a_tls_client_auth_client(env: Env) -> None:
    """RFC 7591 over HTTP: the RFC 8705 members are accepted, stored and echoed; a second subject
    member is ``invalid_client_metadata``; the registered client then authenticates by certificate."""
    iat = await env.services.clients.create_initial_access_token("mtls test", lei=LEI)
    body = base_metadata(
        token_endpoint_auth_method="tls_client_auth",
        tls_client_auth_san_uri=CLIENT_URI,
        tls_client_certificate_bound_access_tokens=True,
    )
    body.pop("introspection_resources")  # operator-only
    headers = {"Authorization": f"Bearer {iat}"}

    created = await env.proxy.post("/register", json=body, headers=headers)
    refused = await env.proxy.post(
        "/register", json={**body, "tls_client_auth_san_dns": CLIENT_DNS}, headers=headers
    )

    assert created.status_code == 201, created.text
    registered = created.json()
    assert registered["tls_client_auth_san_uri"] == CLIENT_URI
    assert registered["tls_client_certificate_bound_access_tokens"] is True
    assert "client_secret" not in registered
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_client_metadata"
    env.ids["registered"] = registered["client_id"]
    response = await env.token("registered", env.pki.client)
    assert response.status_code == 200, response.text
