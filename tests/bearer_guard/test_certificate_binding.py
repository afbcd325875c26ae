"""RFC 8705 §3 at trustplane's own bearer-protected APIs (the one guard): a certificate-bound access
token (``cnf.x5t#S256``) is accepted only with the client certificate it is bound to. Without this
check a stolen certificate-bound token worked as a plain bearer token at the PDP, the ledger, the
mandates, federation and SSF APIs."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tests.bearer_guard.test_guarded_routes import APIS, call, challenge, mint
from tests.conftest import LEI
from tests.protocol_server import Server, running_server
from trustplane.tls import certificate_thumbprint

pytestmark = pytest.mark.asyncio(loop_scope="module")
CERT_HEADER = "x-ssl-client-cert"


def _certificate(name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


OURS, OTHER = _certificate("pep"), _certificate("somebody else")


def _header(cert: x509.Certificate) -> tuple[str, str]:
    """The certificate as a TLS-terminating proxy passes it (URL-encoded PEM)."""
    return (CERT_HEADER, quote(cert.public_bytes(Encoding.PEM).decode("ascii")))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    """The in-process test client connects from 127.0.0.1: a trusted proxy here."""
    async with running_server(
        request,
        tmp_path_factory,
        "sqlite",
        tls_client_cert_header=CERT_HEADER,
        trusted_proxies=("127.0.0.0/8",),
    ) as started:
        yield started


CASES: list[tuple[str, Any, x509.Certificate | None, int]] = [
    ("its-certificate", certificate_thumbprint(OURS), OURS, 200),
    ("no-certificate", certificate_thumbprint(OURS), None, 401),
    ("another-certificate", certificate_thumbprint(OURS), OTHER, 401),
    ("malformed-thumbprint", 12345, OURS, 401),
    ("empty-thumbprint", "", OURS, 401),
]


@pytest.mark.parametrize("api", APIS, ids=[a.name for a in APIS])
@pytest.mark.parametrize(
    ("thumbprint", "presented", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_a_certificate_bound_token_needs_its_certificate(
    server: Server, api: Any, thumbprint: Any, presented: x509.Certificate | None, status: int
) -> None:
    token = mint(server, api, extra={"lei": LEI, "cnf": {"x5t#S256": thumbprint}})
    headers = [("Authorization", f"Bearer {token}")]
    if presented is not None:
        headers.append(_header(presented))
    response = await call(server, api, headers)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json()["error"] == "invalid_token"
        assert challenge(response)["error"] == "invalid_token"
        assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("api", APIS[:1], ids=[a.name for a in APIS[:1]])
async def test_an_unbound_token_needs_no_certificate(server: Server, api: Any) -> None:
    token = mint(server, api)
    response = await call(server, api, [("Authorization", f"Bearer {token}")])
    assert response.status_code == 200, response.text
