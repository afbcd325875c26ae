"""The trust profile's ``token_binding``: tokens issued on a partner's assertion are sender-constrained
unless the partner's profile allows bearer tokens (BRIEF, trust boundaries).

Both grants that issue on a partner's token (jwt-bearer, RFC 7523 §2.1; token exchange, RFC 8693 §2.1)
call :func:`require_binding` right after verifying it and before its ``jti`` is used, so a refusal
leaves the assertion usable. The binding itself is the token endpoint's, decided before the grant
runs (:mod:`trustplane.grant.binding`); this only checks that it is the one the profile requires.

Wire errors, for a request without the required proof or certificate (400, both grants):

- ``dpop`` and no ``DPoP`` header: ``invalid_dpop_proof``, as for a client registered with
  ``dpop_bound_access_tokens`` (RFC 9449 §5.2 names no code; Keycloak answers that case
  ``invalid_dpop_proof`` "DPoP proof is missing"; node-oidc-provider ``invalid_grant``, which here
  would tell the partner its assertion is bad);
- ``mtls`` without a certificate-bound request, or ``sender_constrained`` with neither:
  ``invalid_request`` (RFC 8705 names no code; the fapi2 client profile answers the same,
  ``reason_id`` ``sender_constraint_required``).
"""

from __future__ import annotations

from trustplane.dpop.errors import InvalidDpopProofError
from trustplane.errors import InvalidRequestError
from trustplane.federation.profile import TokenBinding, TrustProfile
from trustplane.grant.binding import current_binding

REASON = "sender_constraint_required"


def require_binding(partner: TrustProfile) -> None:
    """Raise unless the current token request's binding is what ``partner.token_binding`` requires."""
    required, binding = partner.token_binding, current_binding()
    name = partner.partner_id
    if required is TokenBinding.BEARER:
        return
    if required is TokenBinding.DPOP and binding.jkt is None:
        raise InvalidDpopProofError(
            "this partner's trust profile requires DPoP-bound tokens (token_binding: dpop): send "
            "a DPoP proof (RFC 9449)",
            debug="partner_dpop_required",
            reason_id=REASON,
            partner=name,
        )
    if required is TokenBinding.MTLS and "x5t#S256" not in (binding.cnf or {}):
        raise InvalidRequestError(
            "this partner's trust profile requires certificate-bound tokens (token_binding: "
            "mtls): authenticate with a client certificate (RFC 8705)",
            debug="partner_mtls_required",
            reason_id=REASON,
            partner=name,
        )
    if binding.kind == "none":
        raise InvalidRequestError(
            "this partner's trust profile requires sender-constrained tokens (token_binding: "
            "sender_constrained): send a DPoP proof (RFC 9449) or authenticate with a client "
            "certificate (RFC 8705)",
            debug="partner_sender_constraint_required",
            reason_id=REASON,
            partner=name,
        )
