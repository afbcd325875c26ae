"""The public listener's TLS context, and the ASGI TLS extension for each connection.

FAPI 2.0 Security Profile §5.2.1 (network layer protections): TLS 1.2 or later; with TLS 1.2 only
TLS_DHE_RSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
TLS_DHE_RSA_WITH_AES_256_GCM_SHA384 and TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 (which means an RSA
server key for TLS 1.2 clients; the DHE suites need DH parameters, which Python's ``ssl`` does not
load by default, so in practice the two ECDHE suites are offered). TLS 1.3 is negotiated whenever the
client offers it (OpenSSL always prefers the highest common version), with OpenSSL's TLS 1.3 suites.

A client certificate is *optional* at the handshake (``CERT_OPTIONAL``): a client without one can
still use ``private_key_jwt`` or DPoP; one that sends a certificate must send one that chains to
``tls_client_ca``, or the handshake fails. The application decides, per client and per token,
whether a certificate is required (:mod:`trustplane.clients.authentication`, :mod:`trustplane.pep.binding`).
"""

from __future__ import annotations

import ssl
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from trustplane.settings import Settings

#: FAPI 2.0 §5.2.1.1, in OpenSSL's names (TLS 1.2 only; TLS 1.3 suites are configured separately).
FAPI_TLS12_CIPHERS = (
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
)
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def server_context(settings: Settings) -> ssl.SSLContext:
    """The listener's context: certificate and key, TLS 1.2+, FAPI suites, client CA (optional
    client certificate). Raises ``OSError``/``ssl.SSLError`` for unreadable files."""
    assert settings.tls_certificate is not None
    assert settings.tls_key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(":".join(FAPI_TLS12_CIPHERS))
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(settings.tls_certificate, settings.tls_key)
    ctx.set_alpn_protocols(["http/1.1"])
    if settings.tls_client_ca is not None:
        ctx.load_verify_locations(cafile=settings.tls_client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def cipher_ids(ctx: ssl.SSLContext) -> dict[str, int]:
    """OpenSSL cipher name -> the 16-bit IANA value (the ASGI extension's ``cipher_suite``)."""
    return {c["name"]: c["id"] & 0xFFFF for c in ctx.get_ciphers()}


def tls_extension(ssl_object: ssl.SSLObject, ciphers: dict[str, int]) -> dict[str, Any]:
    """The ASGI TLS extension (asgiref ``specs/tls.rst``, version 0.2) of one connection.

    ``client_cert_chain`` holds the client certificate alone: Python before 3.13 exposes only the
    peer's leaf (``getpeercert``), already verified against ``tls_client_ca`` by the handshake, so
    ``client_cert_error`` is always ``None`` (a certificate that fails verification fails the
    handshake instead). ``server_cert`` is ``None``: the server knows its own certificate."""
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name: str | None = None
    if der:
        cert = x509.load_der_x509_certificate(der)
        chain = [cert.public_bytes(Encoding.PEM).decode("ascii")]
        name = cert.subject.rfc4514_string()
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": ciphers.get(cipher[0]) if cipher else None,
    }
