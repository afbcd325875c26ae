"""Interop over mutual TLS with a client nobody on the team wrote: plain httpx with a client
certificate does client_credentials against ``trustplane serve`` terminating TLS itself
(``tls_client_auth``, RFC 8705 §2.1), gets a certificate-bound token (``cnf.x5t#S256``, §3.1), and
takes it to a resource server protected by the PEP SDK, served over TLS by uvicorn with trustplane's
``BoundedHttpToolsProtocol`` (the ASGI ``tls`` extension) and a certificate optional at the handshake
(tests/e2e/interop/pep_app.py). The resource server accepts the token with the same certificate and
refuses it (401 ``invalid_token`` with ``WWW-Authenticate``, RFC 8705 §3 / RFC 6750 §3.1) without a
certificate or with another certificate of the same CA.

The certificates come from :mod:`trustplane.tls.dev_ca` (tests/tls/pki.py).
Conformance-suite counterpart: ``fapi2-security-profile-final-ensure-holder-of-key-required`` (mTLS).
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import free_port, wait_until
from tests.dpop.conftest import ProofKey
from tests.e2e.conftest import PROPAGATION_TIMEOUT, START_TIMEOUT, STOP_TIMEOUT, _die_with_parent
from tests.e2e.test_mtls import (  # the TLS server fixture, reused as is
    TOKEN_FORM,
    TlsServer,
    add_client,
    tls_server,
    wait_for_client,
)
from tests.tls.pki import CLIENT_DN, Pki, build_pki, client_subject
from trustplane.tls.dev_ca import issue

pytestmark = pytest.mark.e2e

__all__ = ["tls_server"]  # a fixture this module uses by name
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test PKI plus a second client certificate of the same CA ("desk-8", another key)."""
    built = build_pki(tmp_path_factory.mktemp("interop-pki"))
    issue(built.ca, client_subject("desk-8")).write(built.directory, "desk8")
    return built


def tls(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(*pki.pair(cert))
    return ctx


@pytest.fixture(scope="module")
def resource_server(tls_server: TlsServer, pki: Pki) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "TP_ISSUER": tls_server.url,
        "TP_CA_FILE": str(pki.ca_file),
        "TP_TLS_CERT": pki.pair("server")[0],
        "TP_TLS_KEY": pki.pair("server")[1],
    }
    url = f"https://127.0.0.1:{port}"
    with subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.interop.pep_app", str(port)],
        env=env,
        cwd=REPO,
        preexec_fn=_die_with_parent,
    ) as proc:
        try:
            wait_until(lambda: _up(url, pki), START_TIMEOUT, "the TLS resource server to start")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)


def _up(url: str, pki: Pki) -> bool:
    try:
        return httpx.get(f"{url}/healthz", verify=tls(pki), timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def thumbprint(pem_file: str) -> str:
    cert = x509.load_pem_x509_certificate(Path(pem_file).read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def test_httpx_client_certificate_token_accepted_only_with_that_certificate(
    tls_server: TlsServer, resource_server: str, pki: Pki
) -> None:
    client_id = add_client(
        tls_server.server, "--auth-method", "tls_client_auth", "--tls-subject", f"dn={CLIENT_DN}"
    )
    wait_for_client(tls_server.url, client_id, verify=tls(pki, "client"))
    with httpx.Client(verify=tls(pki, "client"), timeout=10) as partner:
        issued = partner.post(
            f"{tls_server.url}/token", data={**TOKEN_FORM, "client_id": client_id}
        )
        assert issued.status_code == 200, issued.text
        body = issued.json()
        assert body["token_type"] == "Bearer"  # RFC 8705 keeps the Bearer type
        token = body["access_token"]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["cnf"] == {"x5t#S256": thumbprint(pki.pair("client")[0])}

        accepted = partner.get(
            f"{resource_server}/orders/7", headers={"Authorization": f"Bearer {token}"}
        )
        assert accepted.status_code == 200, accepted.text
        assert accepted.json() == {"order": "7", "client": client_id}

    for cert in (None, "desk8"):  # no certificate; another certificate of the same CA
        with httpx.Client(verify=tls(pki, cert), timeout=10) as thief:
            refused = thief.get(
                f"{resource_server}/orders/7", headers={"Authorization": f"Bearer {token}"}
            )
        assert refused.status_code == 401, (cert, refused.text)
        assert refused.json()["error"] == "invalid_token"
        challenge = refused.headers["WWW-Authenticate"]
        assert 'error="invalid_token"' in challenge, challenge


def test_dpop_bound_certificate_client_still_needs_a_proof(tls_server: TlsServer, pki: Pki) -> None:
    """RFC 9449 §5.2: ``dpop_bound_access_tokens`` asks for the DPoP header; a certificate binding
    alone does not satisfy it. With a proof the token carries both confirmations."""
    client_id = add_client(
        tls_server.server,
        "--auth-method",
        "tls_client_auth",
        "--tls-subject",
        f"dn={CLIENT_DN}",
        "--dpop-bound",
    )
    url = f"{tls_server.url}/token"
    with httpx.Client(verify=tls(pki, "client"), timeout=10) as partner:
        form = {**TOKEN_FORM, "client_id": client_id}
        wait_until(
            lambda: partner.post(url, data=form).status_code == 400,  # 401 until it is loaded
            PROPAGATION_TIMEOUT,
            f"server to authenticate {client_id}",
        )
        refused = partner.post(url, data=form)
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_dpop_proof")
        key = ProofKey.generate()
        issued = partner.post(url, data=form, headers={"DPoP": key.proof(htu=url)})
        assert issued.status_code == 200, issued.text
    assert issued.json()["token_type"] == "DPoP"
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"x5t#S256": thumbprint(pki.pair("client")[0]), "jkt": key.jkt}
