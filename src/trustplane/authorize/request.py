"""Validating an authorization request (RFC 6749 §4.1.1, RFC 7636, RFC 8707, RFC 9396).

Two phases, because what may be done with an error depends on how far validation got:
1. ``client_id`` and ``redirect_uri``. Until both are known to be right, nothing is redirected
   (RFC 6749 §4.1.2.1, RFC 9700 §4.1): errors are :class:`ErrorPage`, shown to the user.
2. Everything else. Errors are :class:`RedirectError` and go back to the client's redirect URI with
   ``error``, ``state`` and ``iss`` (RFC 9207).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from trustplane.authorize import pkce
from trustplane.authorize.redirects import match_redirect_uri
from trustplane.clients.model import Client
from trustplane.clients.resources import select_resource, select_scopes
from trustplane.clients.service import ClientRegistry
from trustplane.errors import (
    InvalidRequestError,
    OAuth2Error,
    UnauthorizedClientError,
    UnsupportedResponseTypeError,
)
from trustplane.protocol.form import Form
from trustplane.protocol.scopes import Vocabulary

MAX_STATE = 1024
#: Raw ``authorization_details`` larger than this are refused before parsing.
MAX_DETAILS = 8192


class ErrorPage(Exception):
    """An error shown to the user (400) instead of redirected: the client or its redirect URI could
    not be established. ``message`` is shown; ``debug`` is logged only; ``error``, when set, is the
    RFC 6749/9101/9126 error code, shown on the page for the developer (``invalid_request_uri``,
    ``invalid_request_object``)."""

    def __init__(
        self, message: str, *, debug: str = "", status: int = 400, error: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.debug, self.status = message, debug or message, status
        self.error = error


@dataclass(frozen=True, slots=True)
class Redirect:
    """Where an authorization response goes (the established client and redirect URI)."""

    client_id: str
    redirect_uri: str
    state: str | None


class RedirectError(Exception):
    """An error returned to the client at its (verified) redirect URI."""

    def __init__(self, target: Redirect, error: OAuth2Error) -> None:
        super().__init__(error.error)
        self.target, self.error = target, error


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """A validated request; everything a code will be bound to."""

    target: Redirect
    redirect_uri_given: bool
    code_challenge: str
    resource: str
    scopes: tuple[str, ...]
    authorization_details: tuple[dict[str, Any], ...]
    force_login: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: RFC 9449 §10: the DPoP key the code is bound to (``dpop_jkt``, or the key of a PAR proof).
    dpop_jkt: str | None = None
    #: RFC 9101: the parameters came in a verified request object (at ``/par`` or ``/authorize``),
    #: so that ``require_signed_request_object`` turned on since can be checked again (RFC 9126 §4).
    signed: bool = False

    @property
    def client_id(self) -> str:
        return self.target.client_id

    def to_dict(self) -> dict[str, Any]:
        t = self.target
        return {
            "c": t.client_id,
            "r": t.redirect_uri,
            "s": t.state,
            "g": self.redirect_uri_given,
            "cc": self.code_challenge,
            "res": self.resource,
            "sc": list(self.scopes),
            "ad": list(self.authorization_details),
            "fl": self.force_login,
            "dj": self.dpop_jkt,
            "sg": self.signed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuthorizationRequest:
        return cls(
            Redirect(d["c"], d["r"], d["s"]),
            bool(d["g"]),
            d["cc"],
            d["res"],
            tuple(d["sc"]),
            tuple(d["ad"]),
            bool(d.get("fl")),
            dpop_jkt=d.get("dj"),
            signed=bool(d.get("sg")),  # absent (stored before it was recorded): not signed
        )


class DetailsValidator(Protocol):
    """What the request parser needs of the RAR registry (``trustplane.rar``)."""

    def validate(
        self, raw: str | list[Any] | None, client: Client
    ) -> tuple[dict[str, Any], ...]: ...


#: Called between the phases with the established client and target; raises what refuses the
#: request there (e.g. "this client must use PAR", as an :class:`RedirectError`).
Gate = Callable[[Client, Redirect], None]


def establish_target(
    form: Form, registry: ClientRegistry, client_id: str | None = None
) -> tuple[Client, Redirect, bool]:
    """Phase 1: the client and the redirect URI, or an :class:`ErrorPage`. ``client_id``: the
    authenticated client at ``/par`` (the form's own ``client_id`` is then optional)."""
    client_id = client_id or form.get("client_id")
    if client_id is None:
        raise ErrorPage("The request does not say which application is asking (client_id).")
    client = registry.get(client_id)
    if client is None or not client.active:
        raise ErrorPage("The application that sent you here is not known.", debug=client_id[:200])
    registered = list(client.metadata.get("redirect_uris", ()))
    requested = form.get("redirect_uri")
    if requested is None:
        if len(registered) != 1:
            raise ErrorPage("The request does not say where to return to (redirect_uri).")
        redirect_uri, given = registered[0], False
    else:
        if match_redirect_uri(requested, registered) is None:
            raise ErrorPage(
                "The return address of this request is not registered for the application.",
                debug=f"redirect_uri mismatch: {requested[:300]!r}",
            )
        redirect_uri, given = requested, True
    state = form.get("state")
    target = Redirect(
        client.client_id, redirect_uri, state if state and len(state) <= MAX_STATE else None
    )
    if state is not None and len(state) > MAX_STATE:
        raise RedirectError(target, InvalidRequestError("state is too long"))
    return client, target, given


def parse_request(
    form: Form,
    registry: ClientRegistry,
    vocabulary: Vocabulary,
    details: DetailsValidator,
    *,
    client_id: str | None = None,
    gate: Gate | None = None,
) -> AuthorizationRequest:
    client, target, given = establish_target(form, registry, client_id)
    if gate is not None:
        gate(client, target)
    try:
        return _validate(form, client, target, given, vocabulary, details)
    except OAuth2Error as exc:
        raise RedirectError(target, exc) from None


def _validate(
    form: Form,
    client: Client,
    target: Redirect,
    given: bool,
    vocabulary: Vocabulary,
    details: DetailsValidator,
) -> AuthorizationRequest:
    response_type = form.get("response_type")
    if response_type is None:
        raise InvalidRequestError("response_type is required")
    if response_type != "code":
        raise UnsupportedResponseTypeError("only response_type=code is supported")
    if form.get("response_mode") not in (None, "query"):
        raise InvalidRequestError("only response_mode=query is supported")
    for unsupported in ("request", "request_uri"):
        if unsupported in form:
            raise InvalidRequestError(f"the {unsupported} parameter is not supported")
    if "authorization_code" not in client.grant_types:
        raise UnauthorizedClientError("this client may not use the authorization_code grant")
    challenge = _pkce(form)
    resource = select_resource(form.get_all("resource"), client, vocabulary)
    scopes = select_scopes(form.get("scope"), client, resource, vocabulary)
    raw_details = form.get("authorization_details")
    if raw_details is not None and len(raw_details) > MAX_DETAILS:
        raise InvalidRequestError("authorization_details is too large")
    granted = details.validate(raw_details, client)
    prompt = (form.get("prompt") or "").split()
    dpop_jkt = form.get("dpop_jkt")
    if dpop_jkt is not None and not pkce.S256_CHALLENGE.fullmatch(dpop_jkt):  # RFC 9449 §10
        raise InvalidRequestError("dpop_jkt is not a base64url SHA-256 JWK thumbprint")
    return AuthorizationRequest(
        target,
        given,
        challenge,
        resource,
        scopes,
        granted,
        force_login="login" in prompt,
        dpop_jkt=dpop_jkt,
    )


def _pkce(form: Form) -> str:
    """RFC 7636 §4.3 with S256 required: a missing method would mean ``plain`` (§4.3), refused."""
    challenge = form.get("code_challenge")
    if challenge is None:
        raise InvalidRequestError("code_challenge is required (PKCE with S256)")
    method = form.get("code_challenge_method")
    if method != "S256":
        raise InvalidRequestError("code_challenge_method must be S256")
    if not pkce.S256_CHALLENGE.fullmatch(challenge):
        raise InvalidRequestError("code_challenge is not a BASE64URL-encoded SHA-256 value")
    return challenge
