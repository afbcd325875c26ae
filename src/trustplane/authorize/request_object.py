"""Request objects (RFC 9101, "JAR"): an authorization request as a JWT the client signed.

Accepted at ``/par`` (RFC 9126 §3) and at ``/authorize`` (the ``request`` parameter). Checks, each
refused with ``invalid_request_object`` (RFC 9101 §6.2):

- a compact JWS (no JWE), ``alg`` one this deployment allows (``allowed_signing_algorithms``: ES256,
  EdDSA, PS256 at most; ``none`` and HS* cannot even be parsed, :mod:`trustplane.jose.jws`), and the
  client's registered ``request_object_signing_alg`` when it registered one;
- ``typ`` absent, ``JWT`` or ``oauth-authz-req+jwt`` (RFC 9101 §10.8): a JWT of another kind (an
  access token, a DPoP proof) is not a request object;
- signed by a key the client registered (``jwks``, or ``jwks_uri`` fetched through the guarded
  outbound fetcher); ``jku``, ``x5u``, ``jwk``, ``x5c`` in the header are never looked at;
- ``iss`` = the client_id, ``aud`` = our issuer identifier (or a list holding it), ``client_id`` in
  the object = the client's (RFC 9101 §5: the one outside, at ``/authorize``, must match too);
- ``exp`` and ``nbf`` required (FAPI 2.0 Security Profile §5.3.2.1): not expired, ``nbf`` not in the
  future (beyond ``clock_skew``; under the fapi2 profile 10..60 s, §5.3.2.1 clause 14) and at most
  60 minutes in the past, ``exp`` at most 60 minutes after
  ``nbf``; an ``iat`` in the future is refused too;
- no ``request`` or ``request_uri`` inside (RFC 9101 §4);
- ``jti``, when present, accepted once until the object expires (the replay cache of client
  assertions, under an issuer key of its own so an assertion and a request object never collide).

Only the object's parameters are used (RFC 9101 §5): what comes beside it is ignored, except
``client_id``, which must match.
"""

from __future__ import annotations

import time
from typing import Any, TypeGuard

import orjson

from trustplane.clients.model import Client
from trustplane.clients.remote_jwks import RemoteJwksCache, signed_with
from trustplane.errors import OAuth2Error
from trustplane.jose.jws import JWSError, ParsedJWS, parse
from trustplane.profile import client_is_fapi2, future_tolerance
from trustplane.protocol.form import REPEATABLE, Form
from trustplane.protocol.replay import ReplayCache
from trustplane.settings import Settings

#: RFC 9101 §10.8 explicit typing; ``JWT`` (and no ``typ``) for the clients that predate it.
REQUEST_OBJECT_TYPS = frozenset({"oauth-authz-req+jwt", "JWT"})
#: FAPI 2.0 Security Profile §5.3.2.1 (and the brief): ``exp`` - ``nbf`` at most 60 minutes, and
#: ``nbf`` no more than 60 minutes in the past.
MAX_LIFETIME = 3600
MAX_NBF_AGE = 3600
MAX_JTI = 256
#: JWT claims of the object itself: never authorization request parameters.
JWT_CLAIMS = frozenset({"iss", "aud", "exp", "nbf", "iat", "jti", "sub"})
#: Parameters read as strings: another JSON type here is a malformed object, not a value to coerce.
STRING_PARAMETERS = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
        "response_mode",
        "prompt",
        "dpop_jkt",
    }
)


class InvalidRequestObjectError(OAuth2Error):
    """RFC 9101 §6.2: the request object is invalid (signature, claims, parameters)."""

    error = "invalid_request_object"


def _is_time(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class RequestObjects:
    """Verifies request objects against the client's registered keys (see the module docstring)."""

    def __init__(
        self, settings: Settings, remote_jwks: RemoteJwksCache, replay: ReplayCache
    ) -> None:
        self._settings, self._remote, self._replay = settings, remote_jwks, replay

    def required(self, client: Client) -> bool:
        """``require_signed_request_object`` (RFC 9101 §10.5): the deployment's or the client's."""
        return self._settings.require_signed_request_object or bool(
            client.metadata.get("require_signed_request_object")
        )

    async def verify(self, token: str, client: Client) -> Form:
        """The object's authorization request parameters, or :class:`InvalidRequestObjectError`."""
        try:
            jws = parse(token)
            claims = jws.claims()
        except JWSError as exc:
            raise InvalidRequestObjectError(
                "the request object is not a signed JWT this server accepts", debug=str(exc)
            ) from None
        self._check_header(client, jws)
        await self._check_signature(client, jws)
        exp = self._check_claims(client, claims)
        form = _parameters(claims)
        await self._consume_jti(client, claims, exp)
        return form

    def _check_header(self, client: Client, jws: ParsedJWS) -> None:
        typ = jws.header.get("typ")
        if typ is not None and typ not in REQUEST_OBJECT_TYPS:
            raise InvalidRequestObjectError(f"request object typ {str(typ)[:40]!r} is not accepted")
        if jws.alg not in self._settings.allowed_signing_algorithms:
            raise InvalidRequestObjectError(f"request object algorithm {jws.alg} is not allowed")
        registered = client.metadata.get("request_object_signing_alg")
        if registered is not None and jws.alg != registered:
            raise InvalidRequestObjectError(
                f"the client registered request_object_signing_alg {registered}"
            )

    async def _check_signature(self, client: Client, jws: ParsedJWS) -> None:
        verified, kid, tried = await signed_with(jws, client.keys, client.jwks_uri, self._remote)
        if not verified:
            raise InvalidRequestObjectError(
                "the request object signature is invalid",
                debug=f"{client.client_id}: kid={kid}, {tried} candidate key(s)",
            )

    def _check_claims(self, client: Client, claims: dict[str, Any]) -> int:
        now, skew = int(time.time()), self._settings.clock_skew
        # fapi2: FAPI 2.0 Security Profile §5.3.2.1 clause 14 (10 s ahead accepted, > 60 s refused)
        ahead = future_tolerance(self._settings, client_is_fapi2(self._settings, client.metadata))
        if claims.get("iss") != client.client_id:
            raise InvalidRequestObjectError("request object iss must be the client_id")
        aud = claims.get("aud")
        issuer = self._settings.issuer
        if aud != issuer and not (isinstance(aud, list) and issuer in aud):
            raise InvalidRequestObjectError("request object aud must be the issuer identifier")
        if claims.get("client_id") != client.client_id:
            raise InvalidRequestObjectError("request object client_id must be the client's")
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if not _is_time(exp):
            raise InvalidRequestObjectError("request object exp is required")
        if not _is_time(nbf):
            raise InvalidRequestObjectError("request object nbf is required")
        if exp <= now - skew:
            raise InvalidRequestObjectError("the request object has expired")
        if nbf > now + ahead:
            raise InvalidRequestObjectError("the request object is not valid yet (nbf)")
        if nbf < now - MAX_NBF_AGE:
            raise InvalidRequestObjectError(
                "request object nbf is more than 60 minutes in the past"
            )
        if exp - nbf > MAX_LIFETIME:
            raise InvalidRequestObjectError("request object exp is more than 60 minutes after nbf")
        if iat is not None and (not _is_time(iat) or iat > now + ahead):
            raise InvalidRequestObjectError("request object iat is in the future")
        return int(exp)

    async def _consume_jti(self, client: Client, claims: dict[str, Any], exp: int) -> None:
        jti = claims.get("jti")
        if jti is None:
            return
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI or not jti.isprintable():
            raise InvalidRequestObjectError(
                f"request object jti must be a printable string of at most {MAX_JTI} characters"
            )
        issuer = f"{client.client_id}#request_object"
        if not await self._replay.consume(issuer, jti, exp + self._settings.clock_skew):
            raise InvalidRequestObjectError(
                "the request object was already used", debug=f"{client.client_id}: jti replay"
            )


def _parameters(claims: dict[str, Any]) -> Form:
    """The authorization request parameters the object carries, as a :class:`Form` (the shape the
    request parser reads). RFC 9101 §4: ``request``/``request_uri`` inside are refused; RFC 9396 §3
    and RFC 8707 §2: ``authorization_details`` is JSON (kept as its JSON text) and ``resource`` may be
    an array."""
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for name, value in claims.items():
        if name in JWT_CLAIMS:
            continue
        if name in ("request", "request_uri"):
            raise InvalidRequestObjectError(f"a request object must not contain {name}")
        if name in REPEATABLE:
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) and v for v in values):
                raise InvalidRequestObjectError(f"request object {name} must be string(s)")
            multi[name] = list(values)
        elif name == "authorization_details":
            single[name] = value if isinstance(value, str) else orjson.dumps(value).decode()
        elif isinstance(value, str):
            if value:  # RFC 6749 §3.1: an empty value is an omitted parameter
                single[name] = value
        elif name in STRING_PARAMETERS:
            raise InvalidRequestObjectError(f"request object {name} must be a string")
    return Form(single, multi)
