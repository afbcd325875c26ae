"""Client metadata validation (RFC 7591 §2 plus trustplane's institutional fields).

Shape errors and semantic errors both become ``invalid_client_metadata``, except redirect URIs, which
get ``invalid_redirect_uri`` (RFC 7591 §3.2.2). The result is the normalised metadata that is stored
and echoed back; fields we do not understand are ignored, as RFC 7591 §2 requires.

Rights over other parties' tokens are not client metadata a client may write. ``resource_server_for``
(the audiences this client is the resource server for: it may introspect tokens addressed there and
exchange them, RFC 7662 §2.1, RFC 8693 §2.1) is granted by the operator alone
(``trustplane clients add --resource-server``); RFC 7591 registration and RFC 7592 update refuse it,
and its former name ``introspection_resources``, with ``invalid_client_metadata``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from stdnum import lei as stdnum_lei

from trustplane.errors import InvalidClientMetadataError, InvalidRedirectUriError
from trustplane.jose.jwk import JWKError, import_public_jwks
from trustplane.outbound.addresses import host_problem
from trustplane.profile import registration_problem
from trustplane.protocol.scopes import Vocabulary
from trustplane.rar.registry import known_types
from trustplane.settings import Profile, Settings, is_loopback_host
from trustplane.tls.verification import SUBJECT_FIELDS, parse_dn

#: Grants this server implements; later grant handlers add themselves here.
SUPPORTED_GRANT_TYPES: set[str] = {
    "client_credentials",
    "authorization_code",
    "refresh_token",
    "urn:ietf:params:oauth:grant-type:jwt-bearer",  # RFC 7523 §2.1, trustplane.federation
    "urn:ietf:params:oauth:grant-type:token-exchange",  # RFC 8693, trustplane.oauth.exchange
}
#: A dNSName SAN value: labels of letters, digits and hyphens (no wildcard: matched exactly).
_DNS_NAME = re.compile(
    r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
SECRET_METHODS = frozenset({"client_secret_basic", "client_secret_post"})
#: Methods whose credential is a key the client registers (RFC 7523, RFC 8705 §2.2).
KEY_METHODS = frozenset({"private_key_jwt", "self_signed_tls_client_auth"})


class ClientMetadataIn(BaseModel):
    """The registration request body (RFC 7591 §2). Unknown members are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    client_name: str | None = Field(default=None, min_length=1, max_length=200)
    lei: str = Field(description="ISO 17442 LEI of the legal entity that owns the client")
    token_endpoint_auth_method: Literal[
        "private_key_jwt",
        "client_secret_basic",
        "client_secret_post",
        "tls_client_auth",
        "self_signed_tls_client_auth",
    ] = "private_key_jwt"
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = Field(default=None, max_length=2000)
    token_endpoint_auth_signing_alg: str | None = Field(default=None, max_length=16)
    grant_types: list[str] = Field(default_factory=lambda: ["client_credentials"], max_length=8)
    response_types: list[str] = Field(default_factory=list, max_length=4)
    scope: str = Field(min_length=1, max_length=2000)
    allowed_resources: list[str] = Field(min_length=1, max_length=32)
    resource_server_for: list[str] = Field(default_factory=list, max_length=32)
    #: The former name of ``resource_server_for`` (operator input only, stored under the new name).
    introspection_resources: list[str] = Field(default_factory=list, max_length=32)
    #: May request Transaction Tokens (draft-ietf-oauth-transaction-tokens-10): operator-only.
    txn_token_requester: bool | None = None
    redirect_uris: list[str] = Field(default_factory=list, max_length=16)
    authorization_details_types: list[str] = Field(default_factory=list, max_length=32)
    # RFC 8705 §2.1.2, §3.4 (mutual TLS)
    tls_client_auth_subject_dn: str | None = Field(default=None, min_length=1, max_length=1000)
    tls_client_auth_san_dns: str | None = Field(default=None, min_length=1, max_length=253)
    tls_client_auth_san_uri: str | None = Field(default=None, min_length=1, max_length=2000)
    tls_client_auth_san_ip: str | None = Field(default=None, min_length=1, max_length=45)
    tls_client_auth_san_email: str | None = Field(default=None, min_length=3, max_length=320)
    tls_client_certificate_bound_access_tokens: bool | None = None
    # RFC 9449 §5.2: every token request of this client must carry a DPoP proof
    dpop_bound_access_tokens: bool | None = None
    # --- pushed authorization requests (RFC 9126 §6) and request objects (RFC 9101 §10.5, OpenID
    # Connect Dynamic Client Registration 1.0 §2 ``request_object_signing_alg``)
    require_pushed_authorization_requests: bool | None = None
    require_signed_request_object: bool | None = None
    request_object_signing_alg: str | None = Field(default=None, max_length=16)
    # --- the fapi2 profile (trustplane.profile, docs/fapi2.md): a client may opt in, never out
    profile: Profile | None = None


def validate_metadata(
    raw: Any, settings: Settings, vocabulary: Vocabulary, *, operator: bool = False
) -> dict[str, Any]:
    """Return normalised metadata or raise the RFC 7591 error naming the first problem.

    ``operator``: the caller is the operator (the CLI), who alone may grant trustplane's own APIs
    (audit ledger, PDP, mandates, federation admin) and rights over other parties' tokens
    (``resource_server_for``); a dynamic registration or update may not."""
    if not isinstance(raw, dict):
        raise InvalidClientMetadataError("the request body must be a JSON object")
    try:
        meta = ClientMetadataIn.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidClientMetadataError(f"{field}: {first['msg']}") from None
    if meta.client_name is not None and not meta.client_name.isprintable():
        # shown to people on the login and consent pages: no line breaks, no bidirectional
        # overrides or other invisible formatting that could make it read as another name
        raise InvalidClientMetadataError(
            "client_name: control and formatting characters are not allowed"
        )
    if not stdnum_lei.is_valid(meta.lei):
        raise InvalidClientMetadataError(
            "lei: not a valid ISO 17442 LEI (length, charset or check digits)"
        )
    if meta.lei != stdnum_lei.compact(meta.lei):  # tokens, policies and mandates compare it exactly
        raise InvalidClientMetadataError(
            "lei: write it in its canonical form (20 upper-case characters, no separators)"
        )
    if meta.token_endpoint_auth_method not in settings.client_auth_methods:
        raise InvalidClientMetadataError(
            f"token_endpoint_auth_method {meta.token_endpoint_auth_method!r} is not enabled here"
        )
    problem = registration_problem(settings, meta.profile, meta.token_endpoint_auth_method)
    if problem is not None:  # the fapi2 profile (FAPI 2.0 Security Profile §5.3.2.1)
        raise InvalidClientMetadataError(problem)
    _check_keys(meta, settings)
    _check_mutual_tls(meta, settings)
    _check_grants(meta)
    _check_scopes_and_resources(meta, vocabulary)
    if not operator:
        _check_no_internal_apis(meta, vocabulary)
        _check_no_resource_server_role(meta)
    _check_details_types(meta, settings)
    _check_request_objects(meta, settings)
    for uri in meta.redirect_uris:
        check_redirect_uri(uri)
    return _normalised(meta)


def _normalised(meta: ClientMetadataIn) -> dict[str, Any]:
    """The stored form: the operator's resource-server grant under its one name, only when given."""
    out = meta.model_dump(exclude_none=True, exclude={"introspection_resources"})
    granted = list(dict.fromkeys([*meta.resource_server_for, *meta.introspection_resources]))
    if granted:
        out["resource_server_for"] = granted
    else:
        del out["resource_server_for"]
    return out


def _check_keys(meta: ClientMetadataIn, settings: Settings) -> None:
    if meta.jwks is not None and meta.jwks_uri is not None:
        raise InvalidClientMetadataError("jwks and jwks_uri must not both be present")
    if meta.token_endpoint_auth_method in KEY_METHODS and not (meta.jwks or meta.jwks_uri):
        raise InvalidClientMetadataError(
            f"{meta.token_endpoint_auth_method} needs jwks or jwks_uri"
        )
    if meta.token_endpoint_auth_method in SECRET_METHODS and (meta.jwks or meta.jwks_uri):
        raise InvalidClientMetadataError("a client_secret client must not register keys")
    if meta.jwks is not None:
        try:
            import_public_jwks(meta.jwks)
        except JWKError as exc:
            raise InvalidClientMetadataError(f"jwks: {exc}") from None
    if meta.jwks_uri is not None:
        _check_jwks_uri(meta.jwks_uri, settings)
    _check_signing_alg(meta, settings)


def _check_jwks_uri(uri: str, settings: Settings) -> None:
    """https, absolute, and a host that can ever be fetched (trustplane.outbound; the fetch-time
    check on the resolved address is the real guard)."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise InvalidClientMetadataError("jwks_uri must be a valid URL") from None
    insecure_ok = settings.allow_insecure_loopback_jwks_uri and is_loopback_host(parts.hostname)
    if parts.scheme != "https" and not (parts.scheme == "http" and insecure_ok):
        raise InvalidClientMetadataError("jwks_uri must be an https URL")
    if not parts.hostname or parts.fragment:
        raise InvalidClientMetadataError("jwks_uri must be an absolute URL without fragment")
    if parts.username is not None:
        raise InvalidClientMetadataError("jwks_uri must not carry credentials")
    problem = host_problem(parts.hostname, allow_loopback=settings.allow_insecure_loopback_jwks_uri)
    if problem is not None:  # a name resolving to such an address is refused when fetched
        raise InvalidClientMetadataError(f"jwks_uri: {problem}; it is never fetched")


def _check_signing_alg(meta: ClientMetadataIn, settings: Settings) -> None:
    """RFC 7591 §2 ``token_endpoint_auth_signing_alg``: the one algorithm the client's assertions may
    use. Only for ``private_key_jwt``, only an algorithm this server allows (never ``none`` or HS*: a
    server holding no shared secret cannot verify an HMAC), and, with inline keys, one they have."""
    alg = meta.token_endpoint_auth_signing_alg
    if alg is None:
        return
    if meta.token_endpoint_auth_method != "private_key_jwt":
        raise InvalidClientMetadataError(
            "token_endpoint_auth_signing_alg applies to private_key_jwt only"
        )
    if alg not in settings.allowed_signing_algorithms:
        raise InvalidClientMetadataError(
            f"token_endpoint_auth_signing_alg {alg[:16]!r} is not allowed here "
            f"(allowed: {', '.join(settings.allowed_signing_algorithms)})"
        )
    if meta.jwks is not None and all(a != alg for _, a, _ in import_public_jwks(meta.jwks)):
        raise InvalidClientMetadataError(
            f"token_endpoint_auth_signing_alg {alg}: no key in jwks is for that algorithm"
        )


def _check_mutual_tls(meta: ClientMetadataIn, settings: Settings) -> None:
    """RFC 8705 §2.1.2: a ``tls_client_auth`` client registers exactly one expected subject value,
    and no other client registers any; §3.4: certificate-bound tokens need mutual TLS here."""
    given = [f for f in SUBJECT_FIELDS if getattr(meta, f) is not None]
    if meta.token_endpoint_auth_method == "tls_client_auth":
        if len(given) != 1:
            raise InvalidClientMetadataError(
                f"tls_client_auth needs exactly one of {', '.join(SUBJECT_FIELDS)}"
                + (f" (got {', '.join(given)})" if given else "")
            )
        _check_subject_value(given[0], str(getattr(meta, given[0])))
    elif given:
        raise InvalidClientMetadataError(f"{given[0]} applies to tls_client_auth only")
    if meta.tls_client_certificate_bound_access_tokens and not settings.mtls_enabled:
        raise InvalidClientMetadataError(
            "tls_client_certificate_bound_access_tokens: this server does not offer mutual TLS"
        )


def _check_subject_value(field: str, value: str) -> None:
    problem = None
    if field == "tls_client_auth_subject_dn":
        try:
            parse_dn(value)
        except ValueError:
            problem = "not an RFC 4514 distinguished name"
    elif field == "tls_client_auth_san_ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            problem = "not an IPv4 or IPv6 address"
    elif field == "tls_client_auth_san_dns":
        if not _DNS_NAME.fullmatch(value):
            problem = "not a DNS name"
    elif field == "tls_client_auth_san_uri":
        parts = urlsplit(value)
        if not parts.scheme or not (parts.netloc or parts.path) or any(c.isspace() for c in value):
            problem = "not an absolute URI"
    elif "@" not in value.strip("@") or any(c.isspace() for c in value):
        problem = "not an email address"
    if problem:
        raise InvalidClientMetadataError(f"{field}: {problem}")


def _check_request_objects(meta: ClientMetadataIn, settings: Settings) -> None:
    """Request objects (RFC 9101) are verified with the client's registered keys only: a client
    that must send them, or names their algorithm, registers keys; the algorithm is one this server
    allows (never ``none`` or HS*), and, with inline keys, one they have."""
    has_keys = bool(meta.jwks or meta.jwks_uri)
    if meta.require_signed_request_object and not has_keys:
        raise InvalidClientMetadataError(
            "require_signed_request_object needs jwks or jwks_uri (request objects are verified "
            "with the client's registered keys)"
        )
    alg = meta.request_object_signing_alg
    if alg is None:
        return
    if not has_keys:
        raise InvalidClientMetadataError("request_object_signing_alg needs jwks or jwks_uri")
    if alg not in settings.allowed_signing_algorithms:
        raise InvalidClientMetadataError(
            f"request_object_signing_alg {alg[:16]!r} is not allowed here "
            f"(allowed: {', '.join(settings.allowed_signing_algorithms)})"
        )
    if meta.jwks is not None and all(a != alg for _, a, _ in import_public_jwks(meta.jwks)):
        raise InvalidClientMetadataError(
            f"request_object_signing_alg {alg}: no key in jwks is for that algorithm"
        )


def _check_grants(meta: ClientMetadataIn) -> None:
    if not meta.grant_types:
        raise InvalidClientMetadataError("grant_types must not be empty")
    unsupported = [g for g in meta.grant_types if g not in SUPPORTED_GRANT_TYPES]
    if unsupported:
        raise InvalidClientMetadataError(f"unsupported grant_types: {', '.join(unsupported)}")
    if meta.response_types and "authorization_code" not in meta.grant_types:
        raise InvalidClientMetadataError("response_types need the authorization_code grant")
    if any(rt != "code" for rt in meta.response_types):
        raise InvalidClientMetadataError("response_types: only 'code' is supported")
    if "authorization_code" in meta.grant_types and not meta.redirect_uris:
        raise InvalidClientMetadataError("the authorization_code grant needs redirect_uris")
    if "refresh_token" in meta.grant_types and "authorization_code" not in meta.grant_types:
        raise InvalidClientMetadataError("refresh_token is only issued with authorization_code")
    if "authorization_code" in meta.grant_types and not meta.response_types:
        # RFC 7591 §2.1: the code grant implies the ``code`` response type (its default, §2); an
        # omitted or empty list would register a client whose metadata denies the flow it uses
        meta.response_types = ["code"]


def _check_scopes_and_resources(meta: ClientMetadataIn, vocabulary: Vocabulary) -> None:
    unknown = [s for s in meta.scope.split() if s not in vocabulary.scopes]
    if unknown:
        raise InvalidClientMetadataError(f"scope: not in the vocabulary: {', '.join(unknown)}")
    for field in ("allowed_resources", "resource_server_for", "introspection_resources"):
        bad = [r for r in getattr(meta, field) if r not in vocabulary.resources]
        if bad:
            raise InvalidClientMetadataError(f"{field}: unknown resource(s): {', '.join(bad)}")


def _check_no_internal_apis(meta: ClientMetadataIn, vocabulary: Vocabulary) -> None:
    internal = vocabulary.internal
    granted = [*meta.allowed_resources, *meta.resource_server_for, *meta.introspection_resources]
    resources = sorted({r for r in granted if r in internal})
    scopes = [s for s in meta.scope.split() if vocabulary.scopes[s].resources <= internal]
    if resources or scopes:
        named = ", ".join([*resources, *scopes])
        raise InvalidClientMetadataError(
            f"{named}: trustplane's own APIs are granted by an operator "
            "(`trustplane clients add`), not by dynamic registration"
        )


def _check_no_resource_server_role(meta: ClientMetadataIn) -> None:
    """Trust boundary: being able to call a resource server never makes a client that resource
    server. The role that reads (RFC 7662) and exchanges (RFC 8693) other clients' tokens for an
    audience is the operator's to give; a registration that asks for it is refused, not trimmed,
    so the client learns it does not hold the right."""
    if meta.txn_token_requester:
        raise InvalidClientMetadataError(
            "txn_token_requester: the right to obtain Transaction Tokens for other clients' "
            "access tokens is granted by an operator (`trustplane clients add "
            "--txn-token-requester`), not by registration"
        )
    for field in ("resource_server_for", "introspection_resources"):
        if getattr(meta, field):
            raise InvalidClientMetadataError(
                f"{field}: rights over other parties' tokens (introspection, token exchange as "
                "their resource server) are granted by an operator "
                "(`trustplane clients add --resource-server`), not by registration"
            )


def _check_details_types(meta: ClientMetadataIn, settings: Settings) -> None:
    """RFC 9396 §10: the ``authorization_details`` types the client may request."""
    unknown = set(meta.authorization_details_types) - known_types(
        settings.authorization_details_types_dir
    )
    if unknown:
        raise InvalidClientMetadataError(
            f"authorization_details_types: unknown type(s): {', '.join(sorted(unknown))}"
        )


#: What the authorization response adds to the redirect URI (RFC 6749 §4.1.2, §4.1.2.1, RFC 9207
#: §2): a registered query keeps its parameters (§3.1.2), so one of these would arrive twice.
RESPONSE_PARAMETERS = frozenset({"code", "state", "error", "error_description", "error_uri", "iss"})


def check_redirect_uri(uri: str) -> None:
    """Exact-match URIs only: absolute, no fragment, no wildcard; https, or http on a loopback IP.
    No whitespace or control characters (RFC 3986 has none; ``urlsplit`` would strip some), no
    query parameter the authorization response adds."""
    if any(c.isspace() or not c.isprintable() for c in uri):
        raise InvalidRedirectUriError(
            "redirect_uris must not contain whitespace or control characters"
        )
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise InvalidRedirectUriError("redirect_uris must be valid absolute URIs") from None
    if "*" in uri:
        raise InvalidRedirectUriError("redirect_uris must not contain wildcards")
    if parts.fragment or "#" in uri:
        raise InvalidRedirectUriError("redirect_uris must not contain a fragment")
    if not parts.scheme or not parts.hostname:
        raise InvalidRedirectUriError("redirect_uris must be absolute URIs")
    taken = RESPONSE_PARAMETERS.intersection(k for k, _ in parse_qsl(parts.query, True))
    if taken:
        raise InvalidRedirectUriError(
            f"redirect_uris: the query must not hold {', '.join(sorted(taken))}: the "
            "authorization response adds it"
        )
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1"):
        return
    raise InvalidRedirectUriError("redirect_uris must use https (http only on 127.0.0.1 or [::1])")
