"""DPoP-bound access tokens at a resource server (RFC 9449 §7). Framework-free.

A token whose claims carry ``cnf.jkt`` is usable only with ``Authorization: DPoP <token>`` and a
``DPoP`` proof signed by that key for this very request; the same token sent as ``Bearer`` is refused
(§7.2: otherwise a stolen bound token would simply be replayed as a bearer token). Turned on by giving
the :class:`~trustplane.pep.PolicyEnforcer` a :class:`DpopBinding`; without one, a bound token is
refused outright (the resource server cannot check the binding, so it fails closed).

=========================================  ======  =====================  ==========================
situation                                  status  ``error``              challenge
=========================================  ======  =====================  ==========================
no Authorization header                    401     (none)                 ``Bearer`` and ``DPoP``
bound token sent as ``Bearer``             401     ``invalid_token``      ``DPoP``
``DPoP`` scheme, token not bound           401     ``invalid_token``      ``DPoP``
proof missing, malformed or failing §4.3   401     ``invalid_dpop_proof`` ``DPoP``
proof key is not the token's ``cnf.jkt``   401     ``invalid_token``      ``DPoP``
nonce required, missing or stale           401     ``use_dpop_nonce``     ``DPoP`` + ``DPoP-Nonce``
=========================================  ======  =====================  ==========================

Every ``DPoP`` challenge names the accepted algorithms: ``algs="ES256 EdDSA PS256"`` (§7.1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from trustplane.dpop.errors import InvalidDpopProofError, UseDpopNonceError
from trustplane.dpop.htu import HtuError, normalize_htu
from trustplane.dpop.nonce import NonceSource
from trustplane.dpop.proof import ALGORITHMS, DpopProof, DpopVerifier
from trustplane.dpop.replay import JtiStore, MemoryJtiStore
from trustplane.errors import (
    InsufficientScopeError,
    InvalidRequestError,
    InvalidTokenError,
    OAuth2Error,
)
from trustplane.pep.bearer import MissingToken, _safe, challenge
from trustplane.pep.keys import ConfigurationError
from trustplane.pep.validator import AccessToken


@dataclass(frozen=True, slots=True)
class DpopRequest:
    """What of an HTTP request a proof is checked against: the method, the absolute URI the client
    sent it to (query and fragment are ignored), and every ``DPoP`` header value."""

    method: str
    url: str
    proofs: tuple[str, ...]


class ResourceDpopProofError(InvalidDpopProofError):
    """``invalid_dpop_proof`` at a resource server: 401 with a DPoP challenge (RFC 9449 §7.1)."""

    status_code = 401


class ResourceDpopNonceError(UseDpopNonceError):
    """``use_dpop_nonce`` at a resource server: 401 with a DPoP challenge (RFC 9449 §9)."""

    status_code = 401


def bound_jkt(token: AccessToken) -> str | None:
    """The token's ``cnf.jkt`` (RFC 9449 §6.1), if it is DPoP-bound. A ``cnf`` that is not an object,
    or a ``jkt`` that is not a non-empty string, is refused: a malformed binding must not pass as
    no binding."""
    if "cnf" not in token.claims:
        return None
    cnf = token.claims["cnf"]
    if not isinstance(cnf, dict):
        raise InvalidTokenError("the token's cnf claim is malformed", debug="cnf_malformed")
    if "jkt" not in cnf:
        return None
    jkt = cnf["jkt"]
    if not isinstance(jkt, str) or not jkt:
        raise InvalidTokenError("the token's cnf.jkt is malformed", debug="cnf_malformed")
    return jkt


def refuse_unverifiable(token: AccessToken) -> None:
    """For a PEP without DPoP: a DPoP-bound token cannot be checked here, so it is refused."""
    if bound_jkt(token) is not None:
        raise InvalidTokenError(
            "this resource server does not accept DPoP-bound tokens", debug="dpop_unsupported"
        )


class DpopBinding:
    """The DPoP half of a resource server's PEP.

    ``replay``: where proof ``jti``s are remembered (default: :class:`MemoryJtiStore`, one process;
    pass ``trustplane.protocol.replay.RedisReplayCache(url)`` when several processes serve the API).
    ``nonce_secret``: when given (16+ bytes, the same on every instance), proofs must carry a nonce
    of this resource server, rotated every ``nonce_lifetime`` seconds (RFC 9449 §9).
    ``public_origin``: the ``https://host[:port]`` clients call (behind a proxy, the request's own
    Host and scheme may differ); default: taken from the request.
    """

    def __init__(
        self,
        *,
        replay: JtiStore | None = None,
        nonce_secret: bytes | None = None,
        nonce_lifetime: int = 300,
        max_age: int = 60,
        max_ahead: int = 10,
        algorithms: Sequence[str] = ALGORITHMS,
        public_origin: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        nonces = NonceSource(nonce_secret, nonce_lifetime) if nonce_secret is not None else None
        self.verifier = DpopVerifier(
            replay if replay is not None else MemoryJtiStore(),
            nonces=nonces,
            max_age=max_age,
            max_ahead=max_ahead,
            algorithms=algorithms,
            clock=clock,
        )
        self.public_origin = _origin(public_origin) if public_origin else None

    def request_url(self, scheme: str, authority: str, raw_path: str) -> str:
        """The URI a proof must name: ``public_origin`` (or scheme and Host) + the raw path."""
        path = raw_path.split("?", 1)[0] or "/"
        origin = self.public_origin or f"{scheme}://{authority}"
        return origin + path

    async def check(
        self, scheme: str, token: AccessToken, request: DpopRequest | None, realm: str
    ) -> DpopProof | None:
        """Refuse the request unless the token's binding holds; the verified proof, or ``None`` for
        an unbound token sent as ``Bearer``."""
        jkt = bound_jkt(token)
        if scheme == "bearer":
            if jkt is None:
                return None
            raise self.challenged(
                InvalidTokenError(
                    "this access token is DPoP-bound: use the DPoP scheme with a proof",
                    debug="dpop_bound_as_bearer",
                ),
                realm,
            )
        if jkt is None:
            error = InvalidTokenError("the access token is not DPoP-bound", debug="dpop_unbound")
            raise self.challenged(error, realm)
        if request is None:
            raise self.challenged(
                ResourceDpopProofError("no DPoP proof", debug="dpop_missing"), realm
            )
        try:
            return await self.verifier.verify_for_resource(
                request.proofs, request.method, request.url, token.token, jkt
            )
        except UseDpopNonceError as exc:
            raise self.challenged(
                ResourceDpopNonceError(exc.nonce, exc.description, debug=exc.debug), realm
            ) from None
        except InvalidDpopProofError as exc:
            raise self.challenged(
                ResourceDpopProofError(exc.description, debug=exc.debug), realm
            ) from None
        except InvalidTokenError as exc:
            raise self.challenged(exc, realm) from None

    def challenged(self, exc: OAuth2Error, realm: str, scheme: str | None = "dpop") -> OAuth2Error:
        """``exc`` with its ``WWW-Authenticate`` set: a request without authentication is answered
        with both schemes; a DPoP error, or a 401/400 of a DPoP request, with a ``DPoP`` challenge.
        Anything else (403, 503, a Bearer request's error) is left to the Bearer challenge."""
        if isinstance(exc, MissingToken):
            value = f"{challenge(realm, exc)}, {self.challenge(realm, None)}"
        elif isinstance(exc, InvalidDpopProofError | UseDpopNonceError) or (
            scheme == "dpop" and isinstance(exc, InvalidTokenError | InvalidRequestError)
        ):
            value = self.challenge(realm, exc)
        else:
            return exc
        exc.headers = {**exc.headers, "WWW-Authenticate": value}
        return exc

    def challenge(self, realm: str, exc: OAuth2Error | None, scope: str | None = None) -> str:
        """``DPoP realm=..., error=..., error_description=..., [scope=...,] algs=...`` (RFC 9449
        §7.1: the RFC 6750 §3 parameters, and ``algs``)."""
        parts = [f'DPoP realm="{_safe(realm)}"']
        if exc is not None:
            parts.append(f'error="{exc.error}"')
            if exc.description:
                parts.append(f'error_description="{_safe(exc.description)}"')
            if scope and isinstance(exc, InsufficientScopeError):
                parts.append(f'scope="{_safe(scope)}"')
        parts.append(f'algs="{self.verifier.algs}"')
        return ", ".join(parts)

    def refused_for(
        self, token: AccessToken, exc: OAuth2Error, realm: str, scope: str | None
    ) -> None:
        """A refusal after the token was accepted (403 ``insufficient_scope``: scope, chain of
        authority, policy) of a request made with a DPoP-bound token: the challenge names the scheme
        the request used, ``DPoP`` (RFC 9449 §7.1), not ``Bearer``."""
        if isinstance(exc, InsufficientScopeError) and bound_jkt(token) is not None:
            exc.headers = {**exc.headers, "WWW-Authenticate": self.challenge(realm, exc, scope)}


def _origin(value: str) -> str:
    """``scheme://host[:port]`` of an absolute http(s) URL with no path, query or fragment."""
    try:
        normal = normalize_htu(value)
    except HtuError as exc:
        raise ConfigurationError(f"public_origin: {exc}") from None
    if urlsplit(normal).path != "/" or "?" in value or "#" in value:
        raise ConfigurationError("public_origin must be scheme://host[:port], without a path")
    return normal.rstrip("/")
