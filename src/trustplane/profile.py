"""The ``fapi2`` profile: the FAPI 2.0 Security Profile (final, February 2025) rules in one place.

A deployment runs ``profile = "default"`` or ``"fapi2"`` (setting ``profile``). A client can be made
stricter, never looser: its registration may say ``"profile": "fapi2"`` on a default deployment; on
a fapi2 deployment ``"profile": "default"`` is refused (``invalid_client_metadata``). A client is
*under fapi2* when the deployment or its registration says so (:func:`client_is_fapi2`).

What the profile adds to the default behaviour (section numbers of the final text; docs/fapi2.md
has the whole table, including what the default profile already does for everyone):

- §5.3.2.1: client authentication ``private_key_jwt``, ``tls_client_auth`` or
  ``self_signed_tls_client_auth`` only (:data:`FAPI2_AUTH_METHODS`): refused at registration
  (``invalid_client_metadata``), at load (``client_auth_methods``) and at the endpoints
  (``invalid_client``);
- §5.3.2.1 clause 10: no refresh token rotation (the refresh token stays valid until it expires
  or is revoked; :func:`rotates_refresh_tokens`);
- §5.3.2.1 clause 14 (clock offsets): ``iat``/``nbf`` up to 10 s in the future accepted, over 60 s
  refused, for client assertions and request objects (:func:`future_tolerance`);
- §5.3.2.2: authorization requests only through PAR (RFC 9126), with ``redirect_uri`` in the
  pushed request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trustplane.settings import FAPI2_AUTH_METHODS, Profile, Settings

__all__ = [
    "FAPI2_ALGORITHMS",
    "FAPI2_AUTH_METHODS",
    "Profile",
    "client_is_fapi2",
    "future_tolerance",
    "registration_problem",
    "rotates_refresh_tokens",
]
#: FAPI 2.0 Security Profile §5.4.1: PS256, ES256, EdDSA (Ed25519). trustplane never allows any
#: other JWS algorithm (``allowed_signing_algorithms`` is typed to these, under either profile; a
#: test keeps the two in step).
FAPI2_ALGORITHMS = frozenset({"PS256", "ES256", "EdDSA"})
#: §5.3.2.1 clause 14: JWTs with ``iat``/``nbf`` up to this many seconds ahead shall be accepted ...
FAPI2_MIN_FUTURE = 10
#: ... and more than this many seconds ahead shall be rejected.
FAPI2_MAX_FUTURE = 60
#: §5.3.2.2 (codes live at most 60 s) needs nothing here: ``authorization_code_lifetime`` cannot
#: be set above 60 under any profile.


def client_is_fapi2(settings: Settings, metadata: Mapping[str, Any]) -> bool:
    """The deployment runs fapi2, or the client opted in by registration."""
    return settings.profile == "fapi2" or metadata.get("profile") == "fapi2"


def future_tolerance(settings: Settings, fapi2: bool) -> int:
    """How far in the future an ``iat``/``nbf`` may lie. Default profile: ``clock_skew``. Under
    fapi2 (§5.3.2.1 clause 14) ``clock_skew`` clamped to 10..60 s, so a fapi2 client on a default
    deployment with ``clock_skew = 0`` (or 300) still gets exactly the FAPI window."""
    if not fapi2:
        return settings.clock_skew
    return min(max(settings.clock_skew, FAPI2_MIN_FUTURE), FAPI2_MAX_FUTURE)


def rotates_refresh_tokens(settings: Settings, metadata: Mapping[str, Any]) -> bool:
    """Default profile: every refresh rotates (RFC 9700 §4.14.2). fapi2: never (§5.3.2.1
    clause 10 and its Note: rotation brings no security benefit for confidential,
    sender-constrained clients and breaks them when a response is lost)."""
    return not client_is_fapi2(settings, metadata)


def registration_problem(settings: Settings, profile: str | None, auth_method: str) -> str | None:
    """Why client metadata is refused under the profile (``invalid_client_metadata``), or None."""
    if settings.profile == "fapi2" and profile not in (None, "fapi2"):
        return "profile: this deployment runs the fapi2 profile; a client cannot opt out of it"
    fapi2 = settings.profile == "fapi2" or profile == "fapi2"
    if fapi2 and auth_method not in FAPI2_AUTH_METHODS:
        return (
            f"token_endpoint_auth_method {auth_method!r} is not allowed under the fapi2 profile "
            "(private_key_jwt, tls_client_auth or self_signed_tls_client_auth; FAPI 2.0 "
            "Security Profile §5.3.2.1)"
        )
    return None
