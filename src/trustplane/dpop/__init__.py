"""DPoP, RFC 9449: proof verification, deployment-wide nonces, proof ``jti`` replay, and what a
verified proof changes in an issued token. Framework-free; see docs/sender_constrained.md.

The token endpoint builds one verifier at start-up (:func:`verifier_from_settings`) and calls
``verify_for_token_endpoint``; the PEP SDK (:mod:`trustplane.pep.dpop`) calls
``verify_for_resource``.
"""

from __future__ import annotations

from trustplane.dpop.errors import InvalidDpopProofError, UseDpopNonceError
from trustplane.dpop.htu import HtuError, normalize_htu
from trustplane.dpop.nonce import NonceSource
from trustplane.dpop.proof import ALGORITHMS, DpopProof, DpopVerifier, access_token_hash
from trustplane.dpop.replay import REPLAY_NAMESPACE, JtiStore, MemoryJtiStore
from trustplane.dpop.tokens import (
    TOKEN_TYPE,
    bind_claims,
    confirmation,
    require_same_key,
    token_response,
)
from trustplane.settings import Settings


def verifier_from_settings(settings: Settings, kek: bytes, replay: JtiStore) -> DpopVerifier:
    """The verifier of a trustplane deployment: ``kek`` is the key-encryption key every instance has
    (``app.key_encryption_key``), from which the nonce key is derived; ``replay`` is the replay cache
    of the assertion ``jti``s (``SqlReplayCache`` or ``RedisReplayCache``)."""
    nonces = (
        NonceSource(kek, settings.dpop_nonce_lifetime) if settings.dpop_nonce_required else None
    )
    return DpopVerifier(
        replay,
        nonces=nonces,
        max_age=settings.dpop_proof_max_age,
        max_ahead=settings.dpop_proof_max_ahead,
    )


__all__ = [
    "ALGORITHMS",
    "REPLAY_NAMESPACE",
    "TOKEN_TYPE",
    "DpopProof",
    "DpopVerifier",
    "HtuError",
    "InvalidDpopProofError",
    "JtiStore",
    "MemoryJtiStore",
    "NonceSource",
    "UseDpopNonceError",
    "access_token_hash",
    "bind_claims",
    "confirmation",
    "normalize_htu",
    "require_same_key",
    "token_response",
    "verifier_from_settings",
]
