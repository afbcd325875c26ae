"""RFC 8705 §3.1: the ``cnf`` of an access token issued to a client that holds a certificate.

A building block for the grants (wired into token issuance separately): a token is bound to the
client certificate of the request (``{"x5t#S256": ...}``, :func:`trustplane.tls.certificate_thumbprint`)
when the client authenticated with it (``tls_client_auth``, ``self_signed_tls_client_auth``) or
registered ``tls_client_certificate_bound_access_tokens`` (RFC 8705 §3.4; any authentication
method). Such a client asking for a token without a certificate is refused (400 ``invalid_request``):
issuing it a bearer token would silently drop the protection it registered for. Any other client
gets an unbound token, even if its connection happened to carry a certificate.
"""

from __future__ import annotations

from trustplane.clients.authentication import AuthenticatedClient
from trustplane.errors import InvalidRequestError
from trustplane.settings import TLS_CLIENT_AUTH_METHODS
from trustplane.tls import certificate_thumbprint

BOUND_TOKENS = "tls_client_certificate_bound_access_tokens"


def wants_certificate_binding(client: AuthenticatedClient) -> bool:
    return (
        client.method in TLS_CLIENT_AUTH_METHODS or client.client.metadata.get(BOUND_TOKENS) is True
    )


def certificate_confirmation(client: AuthenticatedClient) -> dict[str, str] | None:
    """The ``cnf`` claim for a token issued to ``client`` on this request, or None (unbound)."""
    if not wants_certificate_binding(client):
        return None
    if client.certificate is None:
        raise InvalidRequestError(
            "this client's tokens are bound to its TLS client certificate "
            "(tls_client_certificate_bound_access_tokens); present one",
            debug=f"{client.client.client_id}: no client certificate",
        )
    return {"x5t#S256": certificate_thumbprint(client.certificate)}
