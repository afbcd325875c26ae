"""The trust profile's ``token_binding`` with certificate-bound requests (RFC 8705 §3), through the
whole app with the client certificate from a trusted proxy's header (the harness of
tests/oauth/test_mtls_client_auth.py, SQLite): a certificate binding satisfies ``mtls`` and
``sender_constrained``, not ``dpop``; a refusal leaves the partner assertion usable."""

from __future__ import annotations

import httpx
import jwt
import pytest

from tests.conftest import EXECUTION
from tests.dpop.conftest import ProofKey
from tests.federation.partners import JWT_BEARER, Partner
from tests.oauth import test_mtls_client_auth as mtls
from tests.oauth.test_mtls_client_auth import HEADER, Env
from tests.tls.pki import CLIENT_DN, escaped_pem
from trustplane.tls import certificate_thumbprint

pytestmark = pytest.mark.asyncio(loop_scope="module")
env = mtls.env


async def partner_and_client(env: Env, pid: str, binding: str | None) -> tuple[Partner, str]:
    """A partner with this ``token_binding`` and a tls_client_auth client allowed jwt-bearer."""
    partner = Partner(pid, f"https://idp.{pid}.example", env.services.settings.issuer)
    await env.services.federation.add(partner.profile(token_binding=binding), changed_by="test")
    raw = mtls.base_metadata(
        token_endpoint_auth_method="tls_client_auth",
        tls_client_auth_subject_dn=CLIENT_DN,
        grant_types=["client_credentials", JWT_BEARER],
    )
    client = await env.services.clients.register(raw, initial_access_token=None)
    return partner, client.client.client_id


async def grant(
    env: Env, client_id: str, assertion: str, *, certificate: bool, key: ProofKey | None = None
) -> httpx.Response:
    form = {
        "grant_type": JWT_BEARER,
        "assertion": assertion,
        "scope": "order:create",
        "resource": EXECUTION,
        "client_id": client_id,
    }
    headers = {HEADER: escaped_pem(env.pki.client)} if certificate else {}
    if key is not None:
        headers["DPoP"] = key.proof(htu=env.services.settings.issuer + "/token")
    return await env.proxy.post("/token", data=form, headers=headers)


def cnf(response: httpx.Response) -> object:
    assert response.status_code == 200, response.text
    return jwt.decode(response.json()["access_token"], options={"verify_signature": False})["cnf"]


@pytest.mark.parametrize("binding", ["mtls", None])
async def test_a_certificate_bound_request_satisfies_mtls_and_the_default(
    env: Env, binding: str | None
) -> None:
    partner, client_id = await partner_and_client(env, f"p-cert-{binding or 'default'}", binding)
    response = await grant(env, client_id, partner.assertion(), certificate=True)
    assert cnf(response) == {"x5t#S256": certificate_thumbprint(env.pki.client.certificate)}
    assert response.json()["token_type"] == "Bearer"  # RFC 8705 keeps the Bearer scheme


async def test_a_certificate_alone_does_not_satisfy_dpop(env: Env) -> None:
    partner, client_id = await partner_and_client(env, "p-cert-dpop", "dpop")
    assertion = partner.assertion()
    refused = await grant(env, client_id, assertion, certificate=True)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_dpop_proof")
    key = ProofKey.generate()  # the same assertion, now with a proof as well: both bindings
    both = await grant(env, client_id, assertion, certificate=True, key=key)
    thumbprint = certificate_thumbprint(env.pki.client.certificate)
    assert cnf(both) == {"x5t#S256": thumbprint, "jkt": key.jkt}
