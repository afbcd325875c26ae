"""Client authentication at the token, introspection and revocation endpoints.

``private_key_jwt`` follows RFC 7523 §3 as tightened by draft-ietf-oauth-rfc7523bis:
- ``iss`` = ``sub`` = client_id; ``aud`` is exactly our issuer identifier, as a single string;
- ``exp`` required and at most 5 minutes (plus skew) ahead; ``iat``/``nbf`` not beyond the skew
  (under the fapi2 profile: the skew clamped to 10..60 s, :func:`trustplane.profile.future_tolerance`);
- ``jti`` required, accepted once until the assertion expires;
- ES256, EdDSA, PS256 only, and only the client's registered ``token_endpoint_auth_signing_alg``
  when it registered one (RFC 7591 §2); a ``typ`` naming another kind of JWT is refused;
- the key is the client's registered key: ``jku``, ``x5u``, ``jwk``, ``x5c`` are never looked at.
``client_secret_basic`` / ``client_secret_post`` only for clients registered with that method.
``tls_client_auth`` / ``self_signed_tls_client_auth`` (RFC 8705 §2): the request carries only
``client_id``; the client certificate of the request (:func:`trustplane.tls.client_certificate`) is
checked per :mod:`trustplane.tls.verification`. A missing or wrong certificate is ``invalid_client``.
Exactly one method per request (RFC 6749 §2.3); an ``Authorization`` header of another scheme
(``Bearer``, ``DPoP``, ...) is a failed attempt at client authentication: 401 ``invalid_client``
with a ``Basic`` challenge (RFC 6749 §5.2). A client under the fapi2 profile authenticates with
``private_key_jwt`` or a certificate only (FAPI 2.0 Security Profile §5.3.2.1).
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import unquote_plus

from cryptography import x509

from trustplane import metrics
from trustplane.clients.model import Client, secret_matches
from trustplane.clients.remote_jwks import RemoteJwksCache, signed_with
from trustplane.clients.service import ClientRegistry
from trustplane.errors import InvalidClientError, InvalidRequestError
from trustplane.jose.jwk import PublicKey
from trustplane.jose.jws import JWSError, ParsedJWS, parse
from trustplane.profile import FAPI2_AUTH_METHODS, client_is_fapi2, future_tolerance
from trustplane.protocol.form import Form
from trustplane.protocol.replay import ReplayCache, ReplayUse
from trustplane.settings import MAX_ASSERTION_LIFETIME, TLS_CLIENT_AUTH_METHODS, Settings
from trustplane.tls import certificate_thumbprint
from trustplane.tls.verification import (
    SUBJECT_FIELDS,
    CertificateAuthorities,
    CertificateError,
    public_key_matches,
    subject_matches,
)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: ``typ`` values that say "this is a client assertion" (or say nothing specific).
ASSERTION_TYPS = frozenset({"JWT", "client-authentication+jwt"})
MAX_JTI = 256
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


@dataclass(frozen=True, slots=True)
class AuthenticatedClient:
    """``pending_use`` is set when the caller asked to consume the assertion's ``jti`` itself (the
    token endpoint does, to commit it together with the audit record); otherwise it is consumed."""

    client: Client
    method: str
    assertion_jti: str | None = None
    pending_use: ReplayUse | None = None
    #: The client certificate the request came with (any method), for RFC 8705 §3 binding.
    certificate: x509.Certificate | None = None


class ClientAuthenticator:
    def __init__(
        self,
        settings: Settings,
        registry: ClientRegistry,
        replay: ReplayCache,
        remote_jwks: RemoteJwksCache,
    ) -> None:
        self._settings, self._registry, self._replay, self._remote = (
            settings,
            registry,
            replay,
            remote_jwks,
        )
        self._basic_challenge = {"WWW-Authenticate": 'Basic realm="trustplane", charset="UTF-8"'}
        ca = settings.tls_client_ca
        self._authorities = CertificateAuthorities.from_file(ca) if ca is not None else None

    async def authenticate(
        self,
        form: Form,
        authorization: str | None,
        *,
        defer_replay: bool = False,
        certificate: x509.Certificate | None = None,
    ) -> AuthenticatedClient:
        """The authenticated client. ``certificate``: the request's client certificate
        (:func:`trustplane.tls.client_certificate`), kept on the result whatever the method."""
        authenticated = await self._authenticate(form, authorization, defer_replay, certificate)
        if certificate is None:
            return authenticated
        return AuthenticatedClient(
            authenticated.client,
            authenticated.method,
            authenticated.assertion_jti,
            authenticated.pending_use,
            certificate,
        )

    async def _authenticate(
        self,
        form: Form,
        authorization: str | None,
        defer_replay: bool,
        certificate: x509.Certificate | None,
    ) -> AuthenticatedClient:
        # RFC 7617 §2: the scheme is case-insensitive; "Basic" with no credentials is still an
        # attempt at Basic (RFC 6749 §5.2: 401 with the challenge), not "no authentication"
        basic = authorization is not None and authorization.split(" ", 1)[0].lower() == "basic"
        if authorization is not None and not basic:
            self._other_scheme(authorization)
        methods = [
            name
            for name, present in (
                ("client_secret_basic", basic),
                ("client_secret_post", "client_secret" in form),
                ("private_key_jwt", "client_assertion" in form or "client_assertion_type" in form),
            )
            if present
        ]
        if len(methods) > 1:
            self._several(methods, basic)
        if not methods:
            return await self._certificate(form, certificate)
        if basic:
            assert authorization is not None
            return self._basic(authorization, form.get("client_id"))
        if methods[0] == "client_secret_post":
            return self._secret(
                form.require("client_id"), form.require("client_secret"), "client_secret_post"
            )
        return await self._private_key_jwt(form, defer_replay)

    def _other_scheme(self, authorization: str) -> None:
        """An ``Authorization`` header of another scheme than Basic (``Bearer``, ``DPoP``, ...):
        the client attempted to authenticate with the header, so RFC 6749 §5.2 applies: 401
        ``invalid_client`` with a ``WWW-Authenticate`` challenge. The challenge is Basic, the one
        scheme that authenticates a client here (RFC 9110 §11.6.1: a 401's challenge is one
        "applicable to the target resource"; a ``Bearer`` one would invite an access token). The
        header is refused whatever the body carries: one method per request (RFC 6749 §2.3)."""
        scheme = authorization.split(" ", 1)[0][:32]
        if not scheme or not set(scheme) <= _TOKEN_CHARS:  # RFC 9110 §5.6.2 token, echoed back
            scheme = "(malformed)"
        raise InvalidClientError(
            f"the Authorization scheme {scheme} does not authenticate a client here: use Basic"
            " (client_secret_basic) or a method of token_endpoint_auth_methods_supported",
            debug=f"Authorization scheme {scheme}",
            headers=dict(self._basic_challenge),
        )

    def _several(self, methods: list[str], basic: bool) -> None:
        """More than one method in one request (RFC 6749 §2.3): ``invalid_request`` (§5.2), but
        ``invalid_client`` when one of them is a client assertion (RFC 7521 §4.2.1: "if more than
        one client authentication mechanism is used ... MUST be the invalid_client error code")."""
        description = "use exactly one client authentication method"
        if "private_key_jwt" not in methods:
            raise InvalidRequestError(description)
        headers = dict(self._basic_challenge) if basic else None
        raise InvalidClientError(description, debug=" + ".join(methods), headers=headers)

    def _basic(self, authorization: str, body_client_id: str | None) -> AuthenticatedClient:
        """RFC 6749 §2.3.1: credentials are form-urlencoded, then base64. Failure: 401 + challenge.
        A ``client_id`` in the body must name the same client (RFC 6749 §3.2.1 lets a client send
        it; a request naming two clients is malformed: 400 ``invalid_request``, as at /par)."""
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
            raw_id, raw_secret = decoded.split(":", 1)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InvalidClientError(
                "malformed Basic credentials", headers=self._basic_challenge
            ) from None
        client_id = unquote_plus(raw_id)
        if body_client_id is not None and body_client_id != client_id:
            raise InvalidRequestError(
                "client_id does not match the Basic credentials",
                debug=f"Basic {client_id[:100]}, body client_id {body_client_id[:100]}",
            )
        try:
            return self._secret(client_id, unquote_plus(raw_secret), "client_secret_basic")
        except InvalidClientError as exc:
            exc.headers.update(self._basic_challenge)
            raise

    def _secret(self, client_id: str, secret: str, method: str) -> AuthenticatedClient:
        client = self._client(client_id, method)
        if not secret_matches(secret, client.secret_hash):
            raise InvalidClientError(
                "client authentication failed", debug=f"{client_id}: wrong secret"
            )
        return AuthenticatedClient(client, method)

    def _client(self, client_id: str, method: str) -> Client:
        client = self._registry.get(client_id)
        if client is None or not client.active:
            raise InvalidClientError(
                "client authentication failed", debug=f"{client_id}: unknown or disabled"
            )
        if client.auth_method != method or method not in self._settings.client_auth_methods:
            raise InvalidClientError(
                "client authentication failed",
                debug=f"{client_id}: used {method}, registered {client.auth_method}",
            )
        if method not in FAPI2_AUTH_METHODS and client_is_fapi2(self._settings, client.metadata):
            # FAPI 2.0 Security Profile §5.3.2.1 (a client registered before it opted in)
            raise InvalidClientError(
                "client authentication failed",
                debug=f"{client_id}: {method} is not allowed under the fapi2 profile",
            )
        return client

    async def _certificate(
        self, form: Form, certificate: x509.Certificate | None
    ) -> AuthenticatedClient:
        """RFC 8705 §2: ``client_id`` in the request, the client's certificate on the connection."""
        client_id = form.get("client_id")
        registered = self._registry.get(client_id) if client_id is not None else None
        if (
            client_id is None
            or registered is None
            or registered.auth_method not in (TLS_CLIENT_AUTH_METHODS)
        ):
            raise InvalidClientError("client authentication is required")
        client = self._client(client_id, registered.auth_method)
        if certificate is None:
            metrics.CERTIFICATE_CLIENT_AUTH.labels(client.auth_method, "no_certificate").inc()
            raise InvalidClientError(
                f"{client.auth_method} needs a client certificate on the connection",
                debug=f"{client_id}: no client certificate",
            )
        try:
            if client.auth_method == "tls_client_auth":
                self._check_pki(client, certificate)
            else:
                await self._check_self_signed(client, certificate)
        except CertificateError as exc:
            metrics.CERTIFICATE_CLIENT_AUTH.labels(client.auth_method, exc.reason).inc()
            raise InvalidClientError(
                "client authentication failed", debug=f"{client_id}: {exc}"
            ) from None
        metrics.CERTIFICATE_CLIENT_AUTH.labels(client.auth_method, "authenticated").inc()
        return AuthenticatedClient(client, client.auth_method)

    def _check_pki(self, client: Client, certificate: x509.Certificate) -> None:
        if self._authorities is None:  # settings refuse tls_client_auth without tls_client_ca
            raise CertificateError("no tls_client_ca is configured", "chain")
        self._authorities.verify(certificate)
        field = next((f for f in SUBJECT_FIELDS if f in client.metadata), None)
        if field is None or not subject_matches(certificate, field, str(client.metadata[field])):
            raise CertificateError(
                f"the certificate does not carry the registered {field}", "subject"
            )

    async def _check_self_signed(self, client: Client, certificate: x509.Certificate) -> None:
        if public_key_matches(certificate, [key for _, _, key in client.keys]):
            return
        if client.jwks_uri:
            if public_key_matches(certificate, await self._remote_keys(client.jwks_uri, None)):
                return
            # a key not in the cached set (a rotated certificate): refetch like an unknown kid, at
            # most once per min_refetch; the marker names no real kid, so "unknown" is certain
            marker = "x5t#S256:" + certificate_thumbprint(certificate)
            if public_key_matches(certificate, await self._remote_keys(client.jwks_uri, marker)):
                return
        raise CertificateError("the certificate's key is not one of the client's keys", "key")

    async def _remote_keys(self, uri: str, kid: str | None) -> list[PublicKey]:
        return [key for _, _, key in await self._remote.keys(uri, kid)]

    async def _private_key_jwt(self, form: Form, defer_replay: bool) -> AuthenticatedClient:
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise InvalidRequestError(f"client_assertion_type must be {ASSERTION_TYPE}")
        try:
            jws = parse(form.require("client_assertion"))
            claims = jws.claims()
        except JWSError as exc:
            raise InvalidClientError("client assertion is malformed", debug=str(exc)) from None
        client_id = claims.get("iss")
        if not isinstance(client_id, str) or claims.get("sub") != client_id:
            raise InvalidClientError("client assertion iss and sub must both be the client_id")
        if form.get("client_id") not in (None, client_id):
            raise InvalidClientError("client_id does not match the client assertion")
        client = self._client(client_id, "private_key_jwt")
        self._check_header(client, jws)
        await self._check_signature(client, jws)
        jti, exp = self._check_claims(claims, client)
        use = ReplayUse(client_id, jti, int(exp) + self._settings.clock_skew)
        if defer_replay and self._replay.deferrable:
            return AuthenticatedClient(client, "private_key_jwt", jti, pending_use=use)
        if not await self._replay.consume(use.issuer, use.jti, use.expires_at):
            raise InvalidClientError(
                "client assertion was already used", debug=f"{client_id}: jti replay"
            )
        return AuthenticatedClient(client, "private_key_jwt", jti)

    def _check_header(self, client: Client, jws: ParsedJWS) -> None:
        """The algorithm is one we allow and, if the client registered one (RFC 7591 §2
        ``token_endpoint_auth_signing_alg``), exactly that one."""
        typ = jws.header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ not in ASSERTION_TYPS):
            raise InvalidClientError(f"client assertion typ {typ!r} names another kind of JWT")
        if jws.alg not in self._settings.allowed_signing_algorithms:
            raise InvalidClientError(f"algorithm {jws.alg} is not allowed")
        registered = client.metadata.get("token_endpoint_auth_signing_alg")
        if registered is not None and jws.alg != registered:
            raise InvalidClientError(
                f"the client registered token_endpoint_auth_signing_alg {registered}",
                debug=f"{client.client_id}: assertion signed with {jws.alg}",
            )

    async def _check_signature(self, client: Client, jws: ParsedJWS) -> None:
        verified, kid, _ = await signed_with(jws, client.keys, client.jwks_uri, self._remote)
        if not verified:
            raise InvalidClientError(
                "client assertion signature is invalid", debug=f"{client.client_id}: kid={kid}"
            )

    def _check_claims(self, claims: dict[str, Any], client: Client) -> tuple[str, int]:
        now, skew = int(time.time()), self._settings.clock_skew
        # fapi2: FAPI 2.0 Security Profile §5.3.2.1 clause 14 (10 s ahead accepted, > 60 s refused)
        ahead = future_tolerance(self._settings, client_is_fapi2(self._settings, client.metadata))
        if claims.get("aud") != self._settings.issuer:
            raise InvalidClientError("client assertion aud must be exactly the issuer identifier")
        exp = claims.get("exp")
        if not _is_time(exp):
            raise InvalidClientError("client assertion exp is required")
        if exp <= now - skew:
            raise InvalidClientError("client assertion has expired")
        if exp > now + MAX_ASSERTION_LIFETIME + skew:
            raise InvalidClientError(
                f"client assertion exp is more than {MAX_ASSERTION_LIFETIME} s ahead"
            )
        for name in ("iat", "nbf"):
            value = claims.get(name)
            if value is not None and (not _is_time(value) or value > now + ahead):
                raise InvalidClientError(f"client assertion {name} is in the future")
        jti = claims.get("jti")
        # printable only: a NUL cannot be stored in PostgreSQL and would fail the replay batch
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI or not jti.isprintable():
            raise InvalidClientError(
                f"client assertion jti is required: a printable string of at most {MAX_JTI} characters"
            )
        return jti, int(exp)


def _is_time(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
