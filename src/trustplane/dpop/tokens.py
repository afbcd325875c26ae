"""What a verified DPoP proof changes in what the token endpoint issues (RFC 9449 §5, §6).

The token endpoint verifies the proof of a token request with
:meth:`trustplane.dpop.DpopVerifier.verify_for_token_endpoint`, then:

- puts :func:`confirmation` into the access token's claims (``cnf.jkt``, §6.1) and into the
  introspection answer (§6.2);
- answers with :func:`token_response` (``token_type: DPoP``, §5);
- binds a public client's refresh token to the same key and, when it is redeemed, calls
  :func:`require_same_key` (§5: the refresh request's proof must be signed with the bound key);
- compares an authorization request's ``dpop_jkt`` (§10) with :func:`require_same_key` too.
"""

from __future__ import annotations

import hmac
from typing import Any

from trustplane.dpop.errors import InvalidDpopProofError
from trustplane.dpop.proof import DpopProof

TOKEN_TYPE = "DPoP"


def confirmation(proof: DpopProof) -> dict[str, str]:
    """The ``cnf`` claim of a token bound to the proof's key (RFC 9449 §6.1)."""
    return {"jkt": proof.jkt}


def bind_claims(claims: dict[str, Any], proof: DpopProof) -> dict[str, Any]:
    """``claims`` with ``cnf.jkt`` added (other confirmation members, e.g. ``x5t#S256``, are kept)."""
    cnf = claims.get("cnf")
    return {**claims, "cnf": {**(cnf if isinstance(cnf, dict) else {}), **confirmation(proof)}}


def token_response(body: dict[str, Any], proof: DpopProof | None) -> dict[str, Any]:
    """The token response: ``token_type`` is ``DPoP`` when the token is DPoP-bound, ``Bearer``
    otherwise (RFC 9449 §5; clients compare it case-insensitively)."""
    return {**body, "token_type": TOKEN_TYPE if proof is not None else "Bearer"}


def require_same_key(bound_jkt: str, proof: DpopProof) -> None:
    """Refuse a proof not signed with the key a refresh token or an authorization code (``dpop_jkt``)
    is bound to: ``invalid_dpop_proof``."""
    if not hmac.compare_digest(bound_jkt.encode(), proof.jkt.encode()):
        raise InvalidDpopProofError(
            "the DPoP proof key is not the key this grant is bound to", debug="dpop_key_binding"
        )
