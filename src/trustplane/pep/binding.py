"""RFC 8705 §3: certificate-bound access tokens at a resource server. Framework-free.

A token whose ``cnf`` claim carries ``x5t#S256`` is accepted only from the client holding that
certificate: the request's client certificate (:func:`trustplane.tls.client_certificate`: the TLS
connection, or a trusted proxy's header) must have exactly that SHA-256 thumbprint. No certificate,
another certificate, or a malformed ``cnf`` is a 401 ``invalid_token`` (RFC 8705 §3, RFC 6750 §3.1);
the caller adds the ``WWW-Authenticate`` challenge. A token without ``x5t#S256`` is not this
module's business (a DPoP-bound token, ``cnf.jkt``, is checked by the DPoP verifier).
"""

from __future__ import annotations

import hmac

from cryptography import x509

from trustplane.errors import InvalidTokenError
from trustplane.pep.metrics import PEP_REFUSED
from trustplane.pep.validator import AccessToken
from trustplane.tls import certificate_thumbprint

X5T_S256 = "x5t#S256"


def check_certificate_binding(token: AccessToken, certificate: x509.Certificate | None) -> None:
    """Raise :class:`InvalidTokenError` unless a certificate-bound ``token`` came with its
    certificate; return quietly for a token that is not certificate-bound."""
    cnf = token.claims.get("cnf")
    if cnf is None:
        return
    if not isinstance(cnf, dict):
        raise _refused("the token's cnf claim is malformed", "cnf_malformed")
    bound = cnf.get(X5T_S256)
    if bound is None:
        return
    if not isinstance(bound, str) or not bound:
        raise _refused("the token's cnf x5t#S256 is malformed", "cnf_malformed")
    if certificate is None:
        raise _refused(
            "the access token is bound to a client certificate; none was presented",
            "certificate_missing",
        )
    if not hmac.compare_digest(certificate_thumbprint(certificate), bound):
        raise _refused(
            "the access token is bound to another client certificate", "certificate_mismatch"
        )


def _refused(description: str, reason: str) -> InvalidTokenError:
    PEP_REFUSED.labels(error="invalid_token", reason=reason).inc()
    return InvalidTokenError(description, debug=reason)
