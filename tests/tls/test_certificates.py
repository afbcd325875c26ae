"""Where a request's client certificate comes from: the TLS connection, or a trusted proxy's header
(and never a header from anybody else)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import REGISTRY

from tests.tls.pki import Pki, build_pki, escaped_pem
from trustplane.tls import CertificateSource, certificate_thumbprint, client_certificate

HEADER = "x-client-cert"
PROXIES = CertificateSource.build("X-Client-Cert", ["10.0.0.0/8", "fd00::/8"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


def scope(peer: str, headers: list[tuple[str, str]] = (), tls_pem: str | None = None) -> Any:  # type: ignore[assignment]
    out: dict[str, Any] = {
        "type": "http",
        "client": (peer, 50000),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    if tls_pem is not None:
        out["extensions"] = {"tls": {"client_cert_chain": [tls_pem] if tls_pem else []}}
    return out


def ignored(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "trustplane_client_cert_header_ignored_total", {"reason": reason}
    )
    return value or 0.0


def pem(pki: Pki) -> str:
    return pki.client.certificate.public_bytes(Encoding.PEM).decode("ascii")


def test_connection_certificate_without_proxy_configuration(pki: Pki) -> None:
    cert = client_certificate(scope("192.0.2.1", tls_pem=pem(pki)), CertificateSource())
    assert cert == pki.client.certificate


def test_no_tls_extension_no_certificate(pki: Pki) -> None:
    assert client_certificate(scope("192.0.2.1"), CertificateSource()) is None
    assert client_certificate(scope("192.0.2.1", tls_pem=""), CertificateSource()) is None


@pytest.mark.parametrize("peer", ["10.1.2.3", "fd00::1", "::ffff:10.9.9.9"])
def test_trusted_proxy_header_is_the_certificate(pki: Pki, peer: str) -> None:
    request = scope(peer, [("X-Client-Cert", escaped_pem(pki.client))])
    assert client_certificate(request, PROXIES) == pki.client.certificate


def test_rfc9440_byte_sequence_form(pki: Pki) -> None:
    der = base64.b64encode(pki.client.certificate.public_bytes(Encoding.DER)).decode()
    request = scope("10.0.0.1", [(HEADER, f":{der}:")])
    assert client_certificate(request, PROXIES) == pki.client.certificate


def test_header_from_a_non_proxy_is_ignored_and_counted(pki: Pki) -> None:
    before = ignored("untrusted_peer")
    request = scope("192.0.2.66", [(HEADER, escaped_pem(pki.client))])

    assert client_certificate(request, PROXIES) is None
    assert ignored("untrusted_peer") == before + 1


def test_non_proxy_keeps_its_own_connection_certificate(pki: Pki) -> None:
    """A direct TLS client that adds the header gets its own certificate, not the header's."""
    request = scope("192.0.2.66", [(HEADER, escaped_pem(pki.stranger))], tls_pem=pem(pki))
    assert client_certificate(request, PROXIES) == pki.client.certificate


def test_proxy_connection_certificate_is_not_the_clients(pki: Pki) -> None:
    """From a trusted proxy only the header counts: its own TLS certificate says nothing."""
    assert client_certificate(scope("10.0.0.1", tls_pem=pem(pki)), PROXIES) is None


@pytest.mark.parametrize(
    "value",
    [
        "not a certificate",
        "-----BEGIN%20CERTIFICATE-----%0AAAAA%0A-----END%20CERTIFICATE-----",
        ":not base64!:",
        ":QUJD:",
        "x" * 20_000,
    ],
)
def test_malformed_header_from_the_proxy_is_no_certificate_and_counted(value: str) -> None:
    before = ignored("malformed")
    assert client_certificate(scope("10.0.0.1", [(HEADER, value)]), PROXIES) is None
    assert ignored("malformed") == before + 1


def test_repeated_header_is_refused(pki: Pki) -> None:
    before = ignored("malformed")
    request = scope(
        "10.0.0.1", [(HEADER, escaped_pem(pki.client)), (HEADER, escaped_pem(pki.client))]
    )
    assert client_certificate(request, PROXIES) is None
    assert ignored("malformed") == before + 1


def test_empty_header_from_the_proxy_is_no_certificate() -> None:
    before = ignored("malformed")
    assert client_certificate(scope("10.0.0.1", [(HEADER, "")]), PROXIES) is None
    assert ignored("malformed") == before


def test_thumbprint_is_rfc8705_x5t_s256(pki: Pki) -> None:
    import hashlib

    der = pki.client.certificate.public_bytes(Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert certificate_thumbprint(pki.client.certificate) == expected
    assert len(expected) == 43
    assert "=" not in expected


@pytest.mark.parametrize(("header", "proxies"), [("x-cert", []), ("", ["10.0.0.0/8"])])
def test_header_and_proxies_go_together(header: str, proxies: list[str]) -> None:
    with pytest.raises(ValueError, match=r"needs trusted proxies"):
        CertificateSource.build(header, proxies)
