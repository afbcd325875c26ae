"""The PEP SDK for resource servers: validate trustplane (RFC 9068) access tokens, then ask a policy
decision point, in process or over OpenID AuthZEN. See docs/pep.md. Every call the SDK makes (issuer
metadata, JWKS, token, introspection, PDP) goes through an ``OutboundFetcher``: public addresses
only unless ``OutboundPolicy.development()`` allows loopback, no redirects, timeouts, size caps.

The core (``TokenValidator``, ``PolicyEnforcer``, ``AuthzenClient``) is framework-free; the
FastAPI/Starlette dependency lives in ``trustplane.pep.http``. Idempotency keys: the core
(``IdempotencyService``, ``SqlIdempotencyStore``) here, ``IdempotentOperation`` in
``trustplane.pep.idempotency_http``. DPoP-bound tokens (RFC 9449): ``DpopBinding`` given to the
``PolicyEnforcer`` (see ``trustplane.pep.dpop`` and docs/sender_constrained.md).
"""

from trustplane.dpop.replay import MemoryJtiStore
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep.authzen import AuthzenClient
from trustplane.pep.client_auth import ClientSecretBasic, PrivateKeyJwt
from trustplane.pep.dpop import DpopBinding, DpopRequest
from trustplane.pep.enforcer import PolicyEnforcer, client_subject
from trustplane.pep.idempotency import (
    Claim,
    Execute,
    IdempotencyError,
    IdempotencyRecord,
    IdempotencyService,
    IdempotencyStore,
    KeyReusedError,
    MalformedKeyError,
    MissingKeyError,
    Replay,
    RequestOutstandingError,
    StoredResponse,
    fingerprint,
    parse_key,
    serialize_key,
)
from trustplane.pep.idempotency_store import SqlIdempotencyStore
from trustplane.pep.introspection import RevocationCheck
from trustplane.pep.keys import ConfigurationError, TrustedIssuer
from trustplane.pep.provenance import ChainRequirement
from trustplane.pep.txn_token import TxnToken, TxnTokenValidator
from trustplane.pep.validator import AccessToken, TokenValidator

__all__ = [
    "AccessToken",
    "AuthzenClient",
    "ChainRequirement",
    "Claim",
    "ClientSecretBasic",
    "ConfigurationError",
    "DpopBinding",
    "DpopRequest",
    "Execute",
    "IdempotencyError",
    "IdempotencyRecord",
    "IdempotencyService",
    "IdempotencyStore",
    "KeyReusedError",
    "MalformedKeyError",
    "MemoryJtiStore",
    "MissingKeyError",
    "OutboundFetcher",
    "OutboundPolicy",
    "PolicyEnforcer",
    "PrivateKeyJwt",
    "Replay",
    "RequestOutstandingError",
    "RevocationCheck",
    "SqlIdempotencyStore",
    "StoredResponse",
    "TokenValidator",
    "TrustedIssuer",
    "TxnToken",
    "TxnTokenValidator",
    "client_subject",
    "fingerprint",
    "parse_key",
    "serialize_key",
]
