"""The one guard of trustplane's own bearer-protected routes (admin APIs and the AuthZEN PDP).

Framework-free: the HTTP adapter (``trustplane.bearer_guard.http``) hands it the ``Authorization``
header and gets verified claims back, or a typed refusal carrying its RFC 6750 §3 challenge. The
checks, in order (the first that fails answers):

1. RFC 6750 §2.1: the token is in the ``Authorization: Bearer`` header, exactly once, a ``b64token``;
   a token in the query string is refused (``invalid_request``, 400); no header or another scheme is
   :class:`MissingTokenError` (401, bare challenge).
2. RFC 9068 §4: ``typ`` is ``at+jwt`` (or ``application/at+jwt``); the signature verifies with a key
   of our key ring, under the algorithm that key is registered for; ``iss`` is our issuer; the
   claims RFC 9068 §2.2 requires are present and well typed (``jti`` non-empty: revocation is by it).
   RFC 9449 §7.2: a DPoP-bound token (``cnf.jkt``) is refused: no DPoP proof is checked here.
   RFC 8705 §3: a certificate-bound token (``cnf.x5t#S256``) is accepted only with the client
   certificate it is bound to (the TLS connection's, or a trusted proxy's header): none, another, or a
   malformed binding is ``invalid_token``.
3. RFC 7519 §4.1.4/§4.1.5: ``exp`` is in the future (no leeway: our own clock set it), ``nbf`` and
   ``iat`` are not later than now plus ``clock_skew`` (another process of ours may run a little ahead).
4. RFC 7519 §4.1.3 with RFC 9068 §4: ``aud`` identifies this route's API. A string and a one-element
   array are the same audience (§4.1.3); a token for several audiences is refused even when ours is
   among them: such a token lets each of its audiences replay it to the others, and this server never
   issues one (every token has exactly one audience, RFC 8707).
5. The token's client is registered and active (disabling a client ends its tokens at once).
6. RFC 7009: the token is not revoked (the in-memory revocation list, :mod:`.revoked`).
7. A token that rests on a mandate (``mandate`` claim) is refused once that mandate version is no
   longer usable (revoked, suspended, expired, superseded), or when the claim cannot be checked.
8. RFC 6750 §3.1 / RFC 9068 §4: every scope the route requires is in ``scope`` (403
   ``insufficient_scope`` with ``scope="..."`` in the challenge).

Steps 1-2 are cached per token string (a PEP reuses its token for its lifetime): the signature is
verified once, until the key ring changes. Steps 3-8 run on every request; each is a comparison or a
dictionary lookup, except a mandate-bearing token's first check of its mandate head.

Every refusal increments ``trustplane_bearer_refused_total{api, error, reason}`` and logs one
``bearer_refused`` line (the reason is log-only; the description on the wire is for the client).
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from cryptography import x509

from trustplane import metrics
from trustplane.bearer_guard.revoked import RevokedTokens
from trustplane.clients.service import ClientRegistry
from trustplane.errors import (
    InsufficientScopeError,
    InvalidRequestError,
    InvalidTokenError,
    MissingTokenError,
    OAuth2Error,
    wire_description,
)
from trustplane.jose.jws import JWSError, parse
from trustplane.keys.service import KeyRing, KeyService
from trustplane.protocol.scopes import internal_audience
from trustplane.protocol.tokens import VerifiedClaims
from trustplane.tls import CertificateSource, certificate_thumbprint

log = structlog.get_logger("trustplane.bearer_guard")
REALM = "trustplane"
#: RFC 9068 §4: the only ``typ`` values of an access token (media types compare case-insensitively).
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
VERIFIED_CACHE_SIZE = 10_000
QUERY_TOKEN = (
    "access tokens are accepted only in the Authorization header (RFC 6750 §2.1), "
    "never in the query string"
)
#: RFC 6750 §2.1 b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: RFC 6750 §3: error_description and scope use %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash).


class MandateLiveness(Protocol):
    async def is_usable(self, mandate_id: str, version: int) -> bool:
        """Whether that mandate version may still be relied on now."""
        ...


@dataclass(frozen=True, slots=True)
class Protected:
    """What a route requires: the API's audience and the scopes a token must all carry; ``api`` names
    the API in metrics and logs."""

    api: str
    audience: str
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BearerRequest:
    """The parts of an HTTP request the guard reads (the adapter fills it in)."""

    authorization: str | None
    header_count: int = 1
    token_in_query: bool = False
    #: the request's client certificate, read only for a certificate-bound token
    certificate: Callable[[], x509.Certificate | None] = lambda: None


class BearerGuard:
    def __init__(
        self,
        *,
        issuer: str,
        clock_skew: int,
        keys: KeyService,
        clients: ClientRegistry,
        revoked: RevokedTokens,
        mandates: MandateLiveness | None,
        certificates: CertificateSource | None = None,
    ) -> None:
        """``certificates``: where the HTTP adapter reads a request's client certificate (for
        certificate-bound tokens; without it no certificate is ever presented)."""
        self.issuer, self._skew = issuer, clock_skew
        self.certificates = certificates
        self._keys, self._clients, self._revoked, self._mandates = keys, clients, revoked, mandates
        self._verified: dict[str, VerifiedClaims] = {}
        self._ring: KeyRing | None = None

    def route(self, api: str, path: str, *scopes: str) -> Protected:
        """The requirement of a route of the API under ``{issuer}{path}`` needing ``scopes``."""
        return Protected(api, internal_audience(self.issuer, path), scopes)

    async def check(self, request: BearerRequest, route: Protected) -> VerifiedClaims:
        """Every check, scope included: the claims of a token that may call ``route``."""
        claims = await self.authenticate(request, route)
        self.require_scopes(claims, route)
        return claims

    async def authenticate(self, request: BearerRequest, route: Protected) -> VerifiedClaims:
        """Every check but the scope (steps 1-7): our live token, meant for this API."""
        try:
            claims = self._verified_claims(_token(request))
            _check_binding(claims, request)
            self._check_time(claims)
            self._check_audience(claims, route.audience)
            self._check_client(claims)
            if not self._revoked.loaded:
                await self._revoked.load()
            if claims["jti"] in self._revoked:
                raise InvalidTokenError("the access token is revoked", reason_id="revoked")
            if "mandate" in claims:
                await self._check_mandate(claims["mandate"])
        except OAuth2Error as exc:
            raise self._refused(exc, route) from None
        return claims

    def require_scopes(self, claims: VerifiedClaims, route: Protected) -> None:
        """Step 8: the token carries every scope the route requires."""
        granted = str(claims.get("scope", "")).split()
        if any(scope not in granted for scope in route.scopes):
            needed = " ".join(route.scopes)
            exc = InsufficientScopeError(
                f"the access token lacks the scope {needed}", reason_id="scope"
            )
            raise self._refused(exc, route, claims)

    def _verified_claims(self, token: str) -> VerifiedClaims:
        ring = self._keys.ring
        if ring is not self._ring:  # keys changed (rotation, removal): verify everything again
            self._verified.clear()
            self._ring = ring
        claims = self._verified.get(token)
        if claims is None:
            claims = _verify(ring, token, self.issuer)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.pop(next(iter(self._verified)))
            self._verified[token] = claims
        return claims

    def _check_time(self, claims: VerifiedClaims) -> None:
        now = int(time.time())
        if claims["exp"] <= now:
            raise InvalidTokenError("the access token has expired", reason_id="expired")
        if claims.get("nbf", now) > now + self._skew or claims["iat"] > now + self._skew:
            raise InvalidTokenError("the access token is not valid yet", reason_id="not_yet_valid")

    def _check_audience(self, claims: VerifiedClaims, audience: str) -> None:
        aud = claims["aud"]
        if (aud if isinstance(aud, list) else [aud]) != [audience]:
            raise InvalidTokenError(
                f"the access token is not meant (only) for {audience}", reason_id="audience"
            )

    def _check_client(self, claims: VerifiedClaims) -> None:
        client = self._clients.get(claims["client_id"])
        if client is None or not client.active:
            raise InvalidTokenError("the access token's client is not active", reason_id="client")

    async def _check_mandate(self, ref: Any) -> None:
        """A token with a ``mandate`` claim we cannot check (malformed, or no mandate service) fails
        closed; one without the claim rests on no mandate and is not asked about."""
        usable = False
        if self._mandates is not None and isinstance(ref, dict):
            mandate_id, version = ref.get("id"), ref.get("version")
            if isinstance(mandate_id, str) and type(version) is int:
                usable = await self._mandates.is_usable(mandate_id, version)
        if not usable:
            raise InvalidTokenError(
                "the mandate the access token rests on is no longer usable", reason_id="mandate"
            )

    def _refused(
        self, exc: OAuth2Error, route: Protected, claims: VerifiedClaims | None = None
    ) -> OAuth2Error:
        exc.headers = {**exc.headers, "WWW-Authenticate": challenge(exc, route.scopes)}
        reason = exc.reason_id or exc.error
        metrics.BEARER_REFUSED.labels(route.api, exc.error, reason).inc()
        log.info(
            "bearer_refused",
            api=route.api,
            error=exc.error,
            reason=reason,
            client_id=claims.get("client_id") if claims else None,
        )
        return exc


def challenge(exc: OAuth2Error, scopes: tuple[str, ...] = ()) -> str:
    """The ``WWW-Authenticate`` value of a refusal (RFC 6750 §3): bare when no token was sent."""
    parts = [f'Bearer realm="{REALM}"']
    if not isinstance(exc, MissingTokenError):
        parts.append(f'error="{exc.error}"')
        if exc.description:
            parts.append(f'error_description="{_safe(exc.description)}"')
        if scopes and isinstance(exc, InsufficientScopeError):
            parts.append(f'scope="{_safe(" ".join(scopes))}"')
    return ", ".join(parts)


def _check_binding(claims: VerifiedClaims, request: BearerRequest) -> None:
    """The token's ``cnf``, if any. RFC 9449 §7.2: these routes take only the Bearer scheme, so no
    DPoP proof can be checked here; a DPoP-bound token (``cnf.jkt``) presented as a bearer token is
    refused. RFC 8705 §3: a certificate-bound token (``cnf.x5t#S256``) must come with that
    certificate. A ``cnf`` that is not an object, or a malformed thumbprint, is refused too (a
    malformed binding must not pass for none)."""
    cnf = claims.get("cnf")
    if cnf is None:
        return
    if not isinstance(cnf, dict) or "jkt" in cnf:
        raise InvalidTokenError(
            "the access token is DPoP-bound; this API accepts bearer tokens only",
            reason_id="dpop_bound",
        )
    bound = cnf.get("x5t#S256")
    if bound is None:
        return
    if not isinstance(bound, str) or not bound:
        raise InvalidTokenError("the token's cnf x5t#S256 is malformed", reason_id="cnf_malformed")
    certificate = request.certificate()
    if certificate is None:
        raise InvalidTokenError(
            "the access token is bound to a client certificate; none was presented",
            reason_id="certificate_missing",
        )
    if not hmac.compare_digest(certificate_thumbprint(certificate), bound):
        raise InvalidTokenError(
            "the access token is bound to another client certificate",
            reason_id="certificate_mismatch",
        )


def _token(request: BearerRequest) -> str:
    if request.token_in_query:
        raise InvalidRequestError(QUERY_TOKEN, reason_id="query_token")
    if request.authorization is None:
        raise MissingTokenError("a bearer access token is required", reason_id="missing")
    if request.header_count > 1:
        raise InvalidRequestError("more than one Authorization header", reason_id="malformed")
    scheme, _, token = request.authorization.partition(" ")
    if scheme.lower() != "bearer":
        raise MissingTokenError("a bearer access token is required", reason_id="missing")
    token = token.strip(" ")
    if not _B64TOKEN.fullmatch(token):
        raise InvalidRequestError(
            "malformed bearer token in the Authorization header", reason_id="malformed"
        )
    return token


def _verify(ring: KeyRing, token: str, issuer: str) -> VerifiedClaims:
    """Steps 2: type, signature with our ring, issuer, and the claims' shapes."""
    try:
        jws = parse(token)
        if str(jws.header.get("typ", "")).lower() not in ACCESS_TOKEN_TYPES:
            raise InvalidTokenError("the token is not an access token (typ)", reason_id="typ")
        entry = ring.verify_keys.get(str(jws.header.get("kid")))
        if entry is None or entry[0] != jws.alg or not jws.verify(entry[1]):
            raise InvalidTokenError(
                "the access token's signature does not verify", reason_id="signature"
            )
        claims = jws.claims()
    except JWSError:
        raise InvalidTokenError("the access token is malformed", reason_id="malformed") from None
    if claims.get("iss") != issuer:
        raise InvalidTokenError("the access token is from another issuer", reason_id="issuer")
    if not _well_formed(claims):
        raise InvalidTokenError("the access token's claims are malformed", reason_id="claims")
    return VerifiedClaims(claims)


def _well_formed(claims: dict[str, Any]) -> bool:
    """RFC 9068 §2.2: ``exp``, ``iat`` numeric dates; ``jti``, ``client_id``, ``sub`` strings; ``aud`` a
    string or an array of strings; ``nbf`` a numeric date and ``scope`` a string when present."""
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    return (
        all(type(claims.get(name)) is int for name in ("exp", "iat"))
        and type(claims.get("nbf", 0)) is int
        and all(isinstance(claims.get(n), str) and claims[n] for n in ("jti", "client_id", "sub"))
        and bool(audiences)
        and all(isinstance(a, str) for a in audiences)
        and isinstance(claims.get("scope", ""), str)
    )


def _safe(text: str) -> str:
    return wire_description(text)[:300]
