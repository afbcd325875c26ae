"""Authorization server metadata (RFC 8414). ``issuer`` is byte-equal to the configured issuer; no
algorithm list ever names ``none`` or an HMAC algorithm."""

from __future__ import annotations

from typing import Any

from trustplane.clients.metadata import SUPPORTED_GRANT_TYPES
from trustplane.dpop.proof import ALGORITHMS as DPOP_ALGORITHMS
from trustplane.protocol.scopes import Vocabulary
from trustplane.rar.registry import known_types
from trustplane.settings import Settings

PATHS = {
    "authorization_endpoint": "/authorize",
    "token_endpoint": "/token",
    "introspection_endpoint": "/introspect",
    "revocation_endpoint": "/revoke",
    "registration_endpoint": "/register",
    "jwks_uri": "/jwks",
}


def server_metadata(
    settings: Settings, vocabulary: Vocabulary, audit_verifier_key: str | None = None
) -> dict[str, Any]:
    methods = list(settings.client_auth_methods)
    algs = list(settings.allowed_signing_algorithms)
    doc: dict[str, Any] = {"issuer": settings.issuer}
    doc.update({name: settings.issuer + path for name, path in PATHS.items()})
    doc.update(
        {
            "scopes_supported": sorted(vocabulary.scopes),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
            "grant_types_supported": sorted(SUPPORTED_GRANT_TYPES),
            "token_endpoint_auth_methods_supported": methods,
            "token_endpoint_auth_signing_alg_values_supported": algs,
            "introspection_endpoint_auth_methods_supported": methods,
            "introspection_endpoint_auth_signing_alg_values_supported": algs,
            "revocation_endpoint_auth_methods_supported": methods,
            "revocation_endpoint_auth_signing_alg_values_supported": algs,
            "access_token_signing_alg_values_supported": [settings.signing_algorithm],
            # RFC 9449 §5.1: DPoP proofs at the token endpoint (every grant) and at PAR
            "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),
            "authorization_details_types_supported": sorted(
                known_types(settings.authorization_details_types_dir)
            ),
        }
    )
    doc.update(mutual_tls_metadata(settings))
    doc.update(
        {  # pushed authorization requests (RFC 9126 §5) and request objects (RFC 9101 §10)
            "pushed_authorization_request_endpoint": settings.issuer + "/par",
            # forced by the fapi2 profile (FAPI 2.0 Security Profile §5.3.2.2, docs/fapi2.md)
            "require_pushed_authorization_requests": settings.par_required,
            "request_parameter_supported": True,
            # only request_uris from /par: nothing is ever fetched by reference
            "request_uri_parameter_supported": False,
            "request_object_signing_alg_values_supported": algs,
            "require_signed_request_object": settings.require_signed_request_object,
        }
    )
    if audit_verifier_key:  # the audit ledger's checkpoints and the key that signs them (C2SP)
        doc["audit_checkpoint_endpoint"] = settings.issuer + "/audit/checkpoint"
        doc["audit_log_origin"] = settings.audit_origin
        doc["audit_log_verifier_key"] = audit_verifier_key
    return doc


#: RFC 8705 §5: the endpoints a client authenticates at with its certificate.
MTLS_ALIASED = ("token_endpoint", "introspection_endpoint", "revocation_endpoint")


def mutual_tls_metadata(settings: Settings) -> dict[str, Any]:
    """RFC 8705 §3.3 and §5 members, only where client certificates reach trustplane (its own TLS
    with ``tls_client_ca``, or a trusted proxy): ``tls_client_certificate_bound_access_tokens`` and
    ``mtls_endpoint_aliases`` (at ``mtls_base_url``, or at the issuer). The mTLS values of
    ``token_endpoint_auth_methods_supported`` come from ``client_auth_methods``, which the settings
    allow to name them only in that case."""
    if not settings.mtls_enabled:
        return {}
    base = settings.mtls_base_url or settings.issuer
    return {
        "tls_client_certificate_bound_access_tokens": True,
        "mtls_endpoint_aliases": {name: base + PATHS[name] for name in MTLS_ALIASED},
    }
