"""Typed protocol errors, one class per wire ``error`` code.

Each error carries a client-facing ``description`` and a log-only ``debug`` text (the fosite split): the
description goes on the wire, the debug text only into logs and the audit trail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: RFC 6749 §4.1.2.1 and §5.2: ``error_description`` MUST NOT hold characters outside
#: %x20-21 / %x23-5B / %x5D-7E (printable ASCII without the double quote and the backslash). A
#: description may quote what the client sent (a scope, a header value): what falls outside the set
#: is spelled (section sign, quote, backslash, dashes) or replaced by "?".
_NOT_IN_DESCRIPTION = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_SPELLED = str.maketrans({"\u00a7": "section ", '"': "'", "\\": "/", "\u2014": "-", "\u2013": "-"})


def wire_description(text: str) -> str:
    """``text`` as an RFC 6749 ``error_description`` may carry it: in the allowed set. Applied
    where the OAuth endpoints answer (``/authorize`` and ``/par`` in ``trustplane.authorize``;
    ``/token``, ``/introspect``, ``/revoke`` in ``trustplane.oauth.http``) and in the descriptions
    that quote a client's ``authorization_details`` or a partner's assertion."""
    return _NOT_IN_DESCRIPTION.sub("?", text.translate(_SPELLED))


class OAuth2Error(Exception):
    """RFC 6749 §5.2 error response. Subclasses fix ``error`` and the HTTP status."""

    error: ClassVar[str] = "server_error"
    status_code: ClassVar[int] = 400

    def __init__(
        self,
        description: str = "",
        *,
        debug: str = "",
        headers: dict[str, str] | None = None,
        reason_id: str | None = None,
        partner: str | None = None,
    ):
        super().__init__(description or self.error)
        self.description = description
        self.debug = debug or description
        self.headers = headers or {}
        # audit-only: a stable reason (``reason_ids``) and the federated partner concerned, if any
        self.reason_id, self.partner = reason_id, partner

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.description:
            out["error_description"] = self.description
        return out


class InvalidRequestError(OAuth2Error):
    """RFC 6749 §5.2: missing/duplicated/malformed parameter, or more than one auth method."""

    error = "invalid_request"


class InvalidClientError(OAuth2Error):
    """RFC 6749 §5.2: client authentication failed. 401; Basic callers get ``WWW-Authenticate``."""

    error = "invalid_client"
    status_code = 401


class InvalidGrantError(OAuth2Error):
    """RFC 6749 §5.2: the grant or assertion is invalid, expired, revoked or reused."""

    error = "invalid_grant"


class UnauthorizedClientError(OAuth2Error):
    """RFC 6749 §5.2: this client may not use this grant type (or act on that token, RFC 7009)."""

    error = "unauthorized_client"


class UnsupportedGrantTypeError(OAuth2Error):
    """RFC 6749 §5.2: the grant type is not supported by this server."""

    error = "unsupported_grant_type"


class InvalidScopeError(OAuth2Error):
    """RFC 6749 §5.2: scope missing, unknown, not allowed for the client or the resource."""

    error = "invalid_scope"


class InvalidTargetError(OAuth2Error):
    """RFC 8707 §2: the resource is invalid, unknown, or not allowed for this client."""

    error = "invalid_target"


class UnsupportedTokenTypeError(OAuth2Error):
    """RFC 7009 §2.2.1: the server does not support revoking this token type."""

    error = "unsupported_token_type"


class AccessDeniedError(OAuth2Error):
    """RFC 6749 §4.1.2.1: the resource owner or the policy refused the request."""

    error = "access_denied"
    status_code = 403


class InvalidTokenError(OAuth2Error):
    """RFC 6750 §3.1: the bearer token is missing, malformed, expired or revoked. 401."""

    error = "invalid_token"
    status_code = 401


class MissingTokenError(InvalidTokenError):
    """RFC 6750 §3.1: the request carries no bearer token at all (no header, or another scheme). 401;
    the challenge is bare (``Bearer realm="..."``, no error code: the client may not have known that
    authentication is needed), the body still names ``invalid_token`` like every other 401."""


class InsufficientScopeError(OAuth2Error):
    """RFC 6750 §3.1: the token lacks the scope the request needs. 403."""

    error = "insufficient_scope"
    status_code = 403


class InvalidClientMetadataError(OAuth2Error):
    """RFC 7591 §3.2.2: a registration metadata field is invalid."""

    error = "invalid_client_metadata"


class InvalidRedirectUriError(OAuth2Error):
    """RFC 7591 §3.2.2: a redirect URI is invalid (scheme, fragment, wildcard)."""

    error = "invalid_redirect_uri"


class ServerError(OAuth2Error):
    """RFC 6749 §5.2 has no 500 code; used only when a dependency fails closed."""

    error = "server_error"
    status_code = 500


class TemporarilyUnavailableError(OAuth2Error):
    """A dependency (database, replay cache) is unavailable: fail closed, 503."""

    error = "temporarily_unavailable"
    status_code = 503


class InvalidAuthorizationDetailsError(OAuth2Error):
    """RFC 9396 §5: ``authorization_details`` is malformed, names an unknown type, carries a value
    its type does not allow, or asks for a type the client is not registered for."""

    error = "invalid_authorization_details"


class UnsupportedResponseTypeError(OAuth2Error):
    """RFC 6749 §4.1.2.1: only ``response_type=code`` is supported (RFC 9700 §2.1.2)."""

    error = "unsupported_response_type"


class ContentTooLargeError(InvalidRequestError):
    """RFC 9110 §15.5.14: the request content is larger than the endpoint accepts. 413, wire code
    ``invalid_request``."""

    status_code = 413


class NotFoundError(OAuth2Error):
    """Admin APIs: the named object (mandate, partner) does not exist. 404."""

    error = "not_found"
    status_code = 404


class ConflictError(OAuth2Error):
    """Admin APIs: the write conflicts with the current version (``expected_version``). 409."""

    error = "conflict"
    status_code = 409


class InvalidStateError(OAuth2Error):
    """Admin APIs: the object's state does not allow the transition (resume a revoked mandate). 409."""

    error = "invalid_state"
    status_code = 409


class PartnerExistsError(OAuth2Error):
    """Partner admin API: a partner with that id is already registered. 409."""

    error = "partner_exists"
    status_code = 409


class InvalidTrustProfileError(OAuth2Error):
    """Partner admin API: the trust profile document is invalid; ``errors`` lists every problem. 400."""

    error = "invalid_trust_profile"

    def __init__(self, description: str, errors: list[str]) -> None:
        super().__init__(description)
        self.errors = errors

    def body(self) -> dict[str, Any]:
        return {**super().body(), "errors": self.errors}


class UnknownBundleError(OAuth2Error):
    """Policy admin API: no published bundle has that version. 404."""

    error = "unknown_bundle"
    status_code = 404


class InvalidBundleError(OAuth2Error):
    """Policy admin API: a candidate bundle does not validate or its tests fail; ``problems`` lists
    them. 422."""

    error = "invalid_bundle"
    status_code = 422

    def __init__(self, description: str, problems: list[str]) -> None:
        super().__init__(description)
        self.problems = problems

    def body(self) -> dict[str, Any]:
        return {**super().body(), "problems": self.problems}


#: Turns a component's own exception into the typed wire error that answers it.
ToWire = Callable[[Any], OAuth2Error]


@dataclass(frozen=True)
class ErrorTable:
    """How one router answers its errors: the ``endpoint`` label of its metrics and logs, and, per
    component exception type, the typed wire error (which fixes the status and ``error`` code).

    Typed wire errors (:class:`OAuth2Error`) answer as themselves; a component exception answers as
    the entry of its nearest class in the table; anything else is not a request problem (the
    renderer answers 503 for a failed dependency, 500 for a bug)."""

    endpoint: str
    wire: Mapping[type[Exception], ToWire] = field(default_factory=dict)

    def to_wire(self, exc: Exception) -> OAuth2Error | None:
        if isinstance(exc, OAuth2Error):
            return exc
        for kind in type(exc).__mro__:
            make = self.wire.get(kind)
            if make is not None:
                return make(exc)
        return None
