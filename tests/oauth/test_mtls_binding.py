"""Certificate-bound access tokens (RFC 8705 §3) issued by the token endpoint, over HTTP through the
whole app (certificates from a trusted proxy's header, as in test_mtls_client_auth), and used at a
PEP-protected resource server: accepted with the certificate, refused without it."""

from __future__ import annotations

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI
from prometheus_client import REGISTRY

from tests.conftest import EXECUTION
from tests.dpop.conftest import ProofKey
from tests.oauth import test_mtls_client_auth as mtls
from tests.oauth.test_mtls_client_auth import HEADER, Env
from tests.tls.pki import escaped_pem
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import PolicyEnforcer, TokenValidator, TrustedIssuer
from trustplane.pep.http import Pep
from trustplane.pep.validator import AccessToken
from trustplane.policy.bundle import compile_bundle, default_bundle
from trustplane.policy.engine import PolicyEngine
from trustplane.tls import CertificateSource, certificate_thumbprint

pytestmark = pytest.mark.asyncio(loop_scope="module")
#: the app with proxy-mode client certificates and its clients (one per module)
env = mtls.env


def claims_of(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, response.text
    return dict(jwt.decode(response.json()["access_token"], options={"verify_signature": False}))


def issued(binding: str) -> float:
    labels = {"binding": binding}
    return REGISTRY.get_sample_value("trustplane_tokens_issued_by_binding_total", labels) or 0.0


async def test_a_certificate_client_gets_a_certificate_bound_token(env: Env) -> None:
    before = issued("mtls")
    response = await env.token("dn", env.pki.client)
    thumbprint = certificate_thumbprint(env.pki.client.certificate)
    assert claims_of(response)["cnf"] == {"x5t#S256": thumbprint}
    assert response.json()["token_type"] == "Bearer"  # RFC 8705 keeps the Bearer scheme
    assert issued("mtls") == before + 1

    introspected = await env.proxy.post(
        "/introspect",
        data={"token": response.json()["access_token"], "client_id": env.ids["dn"]},
        headers={HEADER: escaped_pem(env.pki.client)},
    )
    assert introspected.status_code == 200, introspected.text
    assert introspected.json()["cnf"] == {"x5t#S256": thumbprint}  # RFC 8705 §3.2
    assert introspected.json()["token_type"] == "Bearer"


async def test_dpop_and_certificate_together_bind_to_both(env: Env) -> None:
    key = ProofKey.generate()
    proof = key.proof(htu=env.services.settings.issuer + "/token")
    form = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        "resource": EXECUTION,
        "client_id": env.ids["dn"],
    }
    response = await env.proxy.post(
        "/token", data=form, headers={HEADER: escaped_pem(env.pki.client), "DPoP": proof}
    )
    thumbprint = certificate_thumbprint(env.pki.client.certificate)
    assert claims_of(response)["cnf"] == {"x5t#S256": thumbprint, "jkt": key.jkt}
    assert response.json()["token_type"] == "DPoP"


async def test_a_self_signed_certificate_client_is_bound_to_its_certificate(env: Env) -> None:
    response = await env.token("self", env.pki.self_signed)
    bound = claims_of(response)["cnf"]
    assert bound == {"x5t#S256": certificate_thumbprint(env.pki.self_signed.certificate)}


def resource_server(env: Env) -> FastAPI:
    app_transport = env.proxy._transport  # the trustplane app, for the PEP's JWKS fetches
    fetcher = OutboundFetcher(OutboundPolicy.development(), transport=app_transport)
    validator = TokenValidator(
        audience=EXECUTION,
        issuers=[TrustedIssuer(env.services.settings.issuer)],
        fetcher=fetcher,
    )
    pdp = PolicyEngine(issuer=env.services.settings.issuer, served_regions=["eu"])
    pdp.activate(compile_bundle(default_bundle()))
    pep = Pep(
        PolicyEnforcer(validator, pdp, realm="execution"),
        certificates=CertificateSource.build(HEADER, ["10.0.0.0/8"]),
    )
    app = FastAPI()
    pep.install(app)

    @app.get("/positions")
    async def positions(token: AccessToken = Depends(pep.token)) -> dict[str, str]:
        return {"client_id": token.client_id}

    return app


async def test_a_bound_token_is_accepted_with_its_certificate_only(env: Env) -> None:
    token = (await env.token("dn", env.pki.client)).json()["access_token"]
    transport = httpx.ASGITransport(app=resource_server(env), client=("10.0.0.5", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://rs.test") as rs:
        auth = {"Authorization": f"Bearer {token}"}
        ok = await rs.get("/positions", headers={**auth, HEADER: escaped_pem(env.pki.client)})
        assert ok.status_code == 200, ok.text
        without = await rs.get("/positions", headers=auth)
        assert (without.status_code, without.json()["error"]) == (401, "invalid_token")
        other = await rs.get(
            "/positions", headers={**auth, HEADER: escaped_pem(env.pki.self_signed)}
        )
        assert (other.status_code, other.json()["error"]) == (401, "invalid_token")
