"""TLS and client certificates: the server's TLS context, where a request's client certificate comes
from (the connection, or a trusted TLS-terminating proxy), and RFC 8705 certificate checks.

* :mod:`trustplane.tls.context`: the listener's ``SSLContext`` (TLS 1.2+, the FAPI 2.0 TLS 1.2 cipher
  suites) and the ASGI ``tls`` scope extension our uvicorn protocol adds (uvicorn has none);
* :mod:`trustplane.tls.certificates`: :func:`client_certificate`, the one place both the server and
  the PEP SDK read a request's certificate, and :func:`certificate_thumbprint` (``x5t#S256``);
* :mod:`trustplane.tls.verification`: chain validation against a CA bundle and the RFC 8705 §2.1.2
  subject matching of ``tls_client_auth``, the key matching of ``self_signed_tls_client_auth``.
"""

from trustplane.tls.certificates import (
    CertificateSource,
    certificate_thumbprint,
    client_certificate,
)

__all__ = ["CertificateSource", "certificate_thumbprint", "client_certificate"]
