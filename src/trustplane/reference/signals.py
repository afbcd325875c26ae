"""The settlement service as a Shared Signals receiver: a revocation at the issuer raises exceptions
on the transactions in flight at once, not when the trade next moves (issue 14 item 5).

The service subscribes to its deployment's SSF transmitter with a poll stream
(:mod:`trustplane.reference.receiver`); this module says which SETs it believes and what they mean.

A SET is verified before anything is done with it (RFC 8417, SSF 1.0 §10): a compact JWS of an
allowed algorithm, no key named in its header, ``typ: secevent+jwt``, signed by a key of the
issuer's JWKS (the configuration's ``jwks_uri``, cached and refetched on an unknown ``kid`` as the
PEP does), ``iss`` the issuer, ``aud`` our client id (a poll stream's audience), ``jti``, ``iat``
not in the future, non-empty ``events``, no ``exp``, no ``sub``
(:func:`trustplane.ssf.receiver.check_set_claims`), and no subject with a member the transmitter's
configuration calls critical (``critical_subject_members``) that we cannot process: only an
``opaque`` ``session`` of a complex subject is (:func:`~trustplane.ssf.receiver.check_critical_members`).
A refused SET goes back in ``setErrs`` with its RFC 8935 error code (the transmitter logs and drops
it); an unreachable JWKS leaves it unacknowledged (delivered again).

Acting: CAEP ``session-revoked``, or ``token-claims-change`` to a mandate status other than
``active``, about a mandate (RFC 9493 ``complex`` subject, ``session`` = the mandate id) or a token
(``jwt_id`` subject of the issuer, ``jti``) becomes a :class:`~trustplane.reference.services.Signal`
and :meth:`TradeServices.raise_on_signal` moves the trades in flight that rest on it to exception.
"""

from __future__ import annotations

import re
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import structlog

from trustplane.federation.registry import KEY_HEADERS
from trustplane.jose.jwk import PublicKey
from trustplane.jose.jws import JWSError, parse
from trustplane.pep.keys import KeySourceError
from trustplane.reference.services import Signal
from trustplane.ssf.receiver import (
    SetRefused,
    check_critical_members,
    check_set_claims,
    restores,
)
from trustplane.ssf.transmitter import SESSION_REVOKED, SET_TYPE, TOKEN_CLAIMS_CHANGE

log = structlog.get_logger("trustplane.reference")
REQUESTED = [SESSION_REVOKED, TOKEN_CLAIMS_CHANGE]
DESCRIPTION = "trustplane reference settlement"
CLOCK_SKEW = 60
_STATUS = re.compile(r"[a-z][a-z_]{0,31}")


class SignalError(Exception):
    """The transmitter cannot be reached or answered something unusable: retried with backoff."""


class KeySource(Protocol):
    async def candidates(self, kid: str | None, alg: str) -> list[PublicKey]: ...


def configuration_url(issuer: str) -> str:
    """SSF 1.0 §7.2: the well-known suffix goes between the host and the issuer's path."""
    parts = urlsplit(issuer)
    path = "/.well-known/ssf-configuration" + parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class SetVerifier:
    """Verifies SETs of one transmitter (``issuer``, keys from ``keys``) addressed to
    ``audience``; raises :class:`SetRefused` (RFC 8935 §2.3 codes) or, when the keys cannot be
    fetched, :class:`SignalError` (not the SET's fault: it stays unacknowledged)."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        keys: KeySource,
        skew: int = CLOCK_SKEW,
        critical: frozenset[str] = frozenset(),
    ):
        """``critical``: the transmitter configuration's ``critical_subject_members``."""
        self.issuer, self.audience, self._keys, self._skew = issuer, audience, keys, skew
        self.critical = critical

    async def verify(self, token: str) -> dict[str, Any]:
        try:
            jws = parse(token)
            claims = jws.claims()
        except JWSError as exc:
            raise SetRefused("invalid_request", f"not an acceptable JWS: {exc}"[:200]) from None
        named = [h for h in KEY_HEADERS if h in jws.header]
        if named:
            raise SetRefused("invalid_key", f"header parameter {named[0]} is refused")
        if jws.header.get("typ") != SET_TYPE:
            raise SetRefused("invalid_request", f"the SET's typ must be {SET_TYPE}")
        kid = jws.header.get("kid")
        try:
            keys = await self._keys.candidates(kid if isinstance(kid, str) else None, jws.alg)
        except KeySourceError as exc:
            raise SignalError(f"the transmitter's keys: {exc}") from None
        if not any(jws.verify(key) for key in keys):
            raise SetRefused("invalid_key", "the signature does not verify with the issuer's keys")
        if claims.get("iss") != self.issuer:
            raise SetRefused("invalid_issuer", "the SET is not from the subscribed transmitter")
        _, events = check_set_claims(claims, self.audience, self._skew)
        for body in events.values():
            subject = claims.get("sub_id")
            if subject is None and isinstance(body, dict):
                subject = body.get("subject")
            check_critical_members(subject, self.critical)
        return claims


def signals_of(claims: dict[str, Any]) -> list[Signal]:
    """The withdrawals a verified SET announces (see the module docstring); other events and
    subjects (verification, stream-updated, a resumed mandate, an ``opaque`` stream subject)
    announce none. A ``jwt_id`` subject of another issuer is refused (``access_denied``)."""
    iss, jti, found = str(claims["iss"]), str(claims["jti"]), []
    for event_type, body in claims["events"].items():
        if event_type not in REQUESTED or restores(event_type, body):
            continue
        subject = claims.get("sub_id")
        if subject is None and isinstance(body, dict):
            subject = body.get("subject")  # CAEP drafts put the subject in the event
        signal = _signal(iss, jti, event_type, body, subject)
        if signal is not None:
            found.append(signal)
    return found


def _signal(iss: str, jti: str, event_type: str, body: Any, subject: Any) -> Signal | None:
    if not isinstance(subject, dict):
        raise SetRefused("invalid_request", "the event has no subject (sub_id)")
    revoked = event_type == SESSION_REVOKED
    name = "session-revoked" if revoked else "token-claims-change"
    session = subject.get("session")
    if subject.get("format") == "complex" and isinstance(session, dict):
        mandate_id = session.get("id")
        if session.get("format") != "opaque" or not isinstance(mandate_id, str) or not mandate_id:
            raise SetRefused("invalid_request", "a complex subject's session needs an opaque id")
        status = _claimed_status(body) if not revoked else "revoked"
        detail = f"the issuer signalled {name} for mandate {mandate_id} (status {status})"
        return Signal(iss, jti, event_type, f"mandate_{status}", detail, mandate_id=mandate_id)
    if subject.get("format") == "jwt_id":
        if subject.get("iss") != iss:
            raise SetRefused(
                "access_denied", "a transmitter may only signal about its own issuer's tokens"
            )
        token_jti = subject.get("jti")
        if not isinstance(token_jti, str) or not token_jti:
            raise SetRefused("invalid_request", "a jwt_id subject needs its jti")
        reason = "token_revoked" if revoked else "token_changed"
        detail = f"the issuer signalled {name} for the acting token {token_jti[:64]}"
        return Signal(iss, jti, event_type, reason, detail, token_jti=token_jti)
    return None


def _claimed_status(body: Any) -> str:
    claims = body.get("claims") if isinstance(body, dict) else None
    status = claims.get("mandate_status") if isinstance(claims, dict) else None
    return status if isinstance(status, str) and _STATUS.fullmatch(status) else "changed"


def issuer_of(configuration: str) -> str:
    """The issuer a configuration URL was formed from (the inverse of :func:`configuration_url`)."""
    parts = urlsplit(configuration)
    prefix = "/.well-known/ssf-configuration"
    if not parts.path.startswith(prefix):
        raise ValueError(f"{configuration!r} is not an SSF configuration URL ({prefix}...)")
    return urlunsplit((parts.scheme, parts.netloc, parts.path[len(prefix) :], "", ""))
