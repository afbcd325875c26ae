"""Where a request's client certificate comes from, in one function for the server and the PEP SDK.

1. The request came from a trusted proxy (its TCP peer address is in ``trusted_proxies``): the
   certificate is the one in the configured header, or none. The proxy's own connection says nothing
   about the client.
2. Any other peer: the certificate of the TLS connection (the ASGI ``tls`` extension, which
   :class:`trustplane.server.BoundedHttpToolsProtocol` adds). A certificate header sent by such a
   peer is ignored, whatever it holds, and counted
   (``trustplane_client_cert_header_ignored_total{reason="untrusted_peer"}``): that is somebody
   trying to choose the certificate the application sees.

Header formats: the URL-encoded PEM of nginx's ``$ssl_client_escaped_cert`` (also HAProxy and
Envoy's URL-encoded forms) and RFC 9440 ``Client-Cert`` (``:base64 DER:``). A header the proxy sent
that cannot be parsed is counted (``reason="malformed"``) and treated as no certificate (fail closed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import Counter

from trustplane.settings import Settings

CLIENT_CERT_HEADER_IGNORED = Counter(
    "trustplane_client_cert_header_ignored_total",
    "Client certificate headers ignored: sent by a peer that is not a trusted proxy, or malformed",
    ["reason"],
)
#: A URL-encoded PEM chain of a few certificates fits; anything larger is refused unparsed.
MAX_HEADER_CHARS = 16 * 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class CertificateSource:
    """How to find a request's client certificate. ``header`` (lower-case name) and
    ``trusted_proxies`` both empty: from the TLS connection only."""

    header: str = ""
    trusted_proxies: tuple[Network, ...] = field(default=())

    @classmethod
    def build(cls, header: str = "", trusted_proxies: Iterable[str] = ()) -> CertificateSource:
        proxies = tuple(ipaddress.ip_network(cidr, strict=True) for cidr in trusted_proxies)
        if bool(header) != bool(proxies):
            raise ValueError("a certificate header needs trusted proxies, and the other way round")
        return cls(header.lower(), proxies)

    @classmethod
    def from_settings(cls, settings: Settings) -> CertificateSource:
        return cls.build(settings.tls_client_cert_header, settings.trusted_proxies)

    def is_trusted_proxy(self, host: str | None) -> bool:
        if host is None or not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted_proxies)


def client_certificate(
    scope: Mapping[str, Any], source: CertificateSource
) -> x509.Certificate | None:
    """The client certificate of this HTTP request (see the module docstring), or None."""
    values = _header_values(scope, source.header) if source.header else []
    client = scope.get("client")
    if source.is_trusted_proxy(client[0] if client else None):
        return _from_header(values)
    if values:
        CLIENT_CERT_HEADER_IGNORED.labels(reason="untrusted_peer").inc()
    tls = scope.get("extensions", {}).get("tls")
    chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
    if not chain:
        return None
    return _pem(next(iter(chain)).encode("ascii"))


def certificate_thumbprint(cert: x509.Certificate) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url (unpadded) SHA-256 of the certificate's DER."""
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _header_values(scope: Mapping[str, Any], name: str) -> list[bytes]:
    wanted = name.encode("latin-1")
    return [bytes(v) for k, v in scope.get("headers", ()) if k.lower() == wanted]


def _from_header(values: list[bytes]) -> x509.Certificate | None:
    """The proxy's header: absent or empty is "no certificate"; repeated (a proxy sets it once, so
    one came from the client), oversized or unparsable is counted and is no certificate either."""
    if not values or (len(values) == 1 and not values[0].strip()):
        return None
    raw = values[0]
    cert = None
    if len(values) == 1 and len(raw) <= MAX_HEADER_CHARS:
        cert = _parse_header(raw.decode("latin-1").strip())
    if cert is None:
        CLIENT_CERT_HEADER_IGNORED.labels(reason="malformed").inc()
    return cert


def _parse_header(value: str) -> x509.Certificate | None:
    if len(value) > 2 and value[0] == ":" and value[-1] == ":":  # RFC 9440 byte sequence
        try:
            return _der(base64.b64decode(value[1:-1], validate=True))
        except binascii.Error:
            return None
    return _pem(unquote(value).encode("ascii", "replace")) if value else None


@lru_cache(maxsize=1024)
def _pem(data: bytes) -> x509.Certificate | None:
    """The first certificate of a PEM text (the client's; the rest is its chain)."""
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        return None


@lru_cache(maxsize=1024)
def _der(data: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        return None
