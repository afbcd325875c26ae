"""RFC 6750 mechanics shared by every bearer-protected endpoint: reading the token from the request
(header only) and writing the ``WWW-Authenticate`` challenge of a refusal. Framework-free."""

from __future__ import annotations

import re

from trustplane.errors import (
    InsufficientScopeError,
    InvalidRequestError,
    InvalidTokenError,
    OAuth2Error,
    wire_description,
)

#: RFC 6750 §2.1 b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: RFC 6750 §3: error_description and scope use %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash).
QUERY_OR_FORM_TOKEN = (
    "access tokens are accepted only in the Authorization header (RFC 6750 §2.1), "
    "never in the query string or the request body"
)


class MissingToken(InvalidTokenError):
    """RFC 6750 §3.1: the request carries no authentication at all. 401 with a bare challenge and no
    error code (the client may simply not have known that authentication is needed)."""

    def body(self) -> dict[str, str]:
        return {"error_description": self.description} if self.description else {}


def bearer_token(authorization: str | None, header_count: int = 1) -> str:
    """The token of an ``Authorization: Bearer`` header (scheme case-insensitive, RFC 9110 §11.1).

    Raises :class:`MissingToken` when there is no header, :class:`InvalidRequestError` when it is
    malformed, repeated, or uses another scheme."""
    return presented_token(authorization, header_count)[1]


def presented_token(
    authorization: str | None, header_count: int = 1, *, dpop: bool = False
) -> tuple[str, str]:
    """``(scheme, token)`` of the Authorization header, the scheme lower-cased: ``bearer``, or
    ``dpop`` (RFC 9449 §7.1, same token68 syntax) when ``dpop`` is accepted. Errors as
    :func:`bearer_token`."""
    wanted = "an access token is required" if dpop else "a bearer access token is required"
    if authorization is None:
        raise MissingToken(wanted)
    if header_count > 1:
        raise InvalidRequestError("more than one Authorization header")
    scheme, _, token = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme != "bearer" and not (dpop and scheme == "dpop"):
        raise MissingToken(wanted)
    token = token.strip(" ")
    if not _B64TOKEN.fullmatch(token):
        raise InvalidRequestError(f"malformed {scheme} token in the Authorization header")
    return scheme, token


def challenge(realm: str, exc: OAuth2Error, scope: str | None = None) -> str:
    """The ``WWW-Authenticate`` value for a refusal (RFC 6750 §3)."""
    parts = [f'Bearer realm="{_safe(realm)}"']
    if not isinstance(exc, MissingToken):
        parts.append(f'error="{exc.error}"')
        if exc.description:
            parts.append(f'error_description="{_safe(exc.description)}"')
        if scope and isinstance(exc, InsufficientScopeError):
            parts.append(f'scope="{_safe(scope)}"')
    return ", ".join(parts)


def with_challenge(exc: OAuth2Error, realm: str, scope: str | None = None) -> OAuth2Error:
    """``exc`` with its ``WWW-Authenticate`` header set (401, 403 and 400 of a bearer request). A
    challenge already set (a DPoP one, :mod:`trustplane.pep.dpop`) is kept."""
    if "WWW-Authenticate" in exc.headers:
        return exc
    if isinstance(exc, InvalidTokenError | InsufficientScopeError | InvalidRequestError):
        exc.headers = {**exc.headers, "WWW-Authenticate": challenge(realm, exc, scope)}
    return exc


def _safe(text: str) -> str:
    return wire_description(text)[:300]
