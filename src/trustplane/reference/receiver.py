"""The settlement service's subscription to its deployment's SSF transmitter: a poll stream
(RFC 8936) whose SETs are verified and acted on by :mod:`trustplane.reference.signals`.

Discovery (SSF 1.0 §7): ``configuration`` is ``{issuer}/.well-known/ssf-configuration``; the
``issuer`` it answers must be the one that URL was formed from, and its endpoints must be on the
issuer's origin (the bearer token goes nowhere else). The token endpoint comes from the issuer's
RFC 8414 metadata (whose ``issuer`` must match too); the token is a client-credentials token for
``{issuer}/ssf`` with scope ``ssf:stream`` (``auth``: ``private_key_jwt``). The stream
(``events_requested``: CAEP ``session-revoked`` and ``token-claims-change``) is found among the
client's streams by its description, or created, and its ``iss`` must be the issuer (SSF 1.0
§8.1.1.1-2). Every request goes through the guarded fetcher.

Polling acknowledges each round's SETs in the next request. A SET is acknowledged only after what
it caused committed: a crash in between redelivers it, and the store makes the second delivery
raise nothing. A refused SET goes back in ``setErrs`` with its RFC 8935 code; one whose keys cannot
be fetched stays unacknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import Counter

from trustplane.jose.jwk import thumbprint
from trustplane.jose.jws import b64url_encode
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep.client_auth import ClientAuth, PrivateKeyJwt
from trustplane.pep.keys import IssuerKeys, TrustedIssuer, check_url, metadata_url
from trustplane.reference.services import TradeServices
from trustplane.reference.settings import ReferenceSettings
from trustplane.reference.signals import (
    DESCRIPTION,
    REQUESTED,
    KeySource,
    SetVerifier,
    SignalError,
    configuration_url,
    issuer_of,
    signals_of,
)
from trustplane.ssf.client import find_or_create_stream, request_json
from trustplane.ssf.receiver import SetRefused, critical_members
from trustplane.ssf.transmitter import POLL

log = structlog.get_logger("trustplane.reference")
SETS = Counter(
    "trustplane_reference_signal_sets_total",
    "SETs the settlement's receiver handled, by outcome (acted, refused)",
    ["outcome"],
)
EXCEPTIONS = Counter(
    "trustplane_reference_signal_exceptions_total",
    "Exceptions raised on trades in flight by the issuer's signals",
)
FAILURES = Counter(
    "trustplane_reference_signal_failures_total",
    "Subscription or poll rounds that failed (retried with backoff)",
)
#: SETs per poll answer, and the answer's size cap (a SET is well under 2 KiB).
MAX_EVENTS = 50
MAX_POLL_BYTES = 256 * 1024
#: Longer than the transmitter's longest poll wait (``ssf_poll_wait`` is at most 60 s).
POLL_TIMEOUT = 70.0
PURPOSE = "reference_signals"


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SignalError(f"{what} is not a JSON object")
    return value


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


@dataclass(frozen=True, slots=True)
class Subscription:
    issuer: str
    token_endpoint: str
    configuration_endpoint: str
    stream_id: str
    poll_url: str


class SignalReceiver:
    """Subscribes to the transmitter at ``configuration`` (as ``auth``'s client) and acts on its
    SETs with ``services``. ``keys``: None for the issuer's ``jwks_uri`` through ``fetcher``."""

    def __init__(
        self,
        services: TradeServices,
        configuration: str,
        auth: ClientAuth,
        fetcher: OutboundFetcher,
        *,
        keys: KeySource | None = None,
        poll_wait: bool = True,
    ) -> None:
        self.configuration = check_url(configuration, "SSF configuration URL", fetcher)
        self._services, self._auth, self._fetcher = services, auth, fetcher
        self._keys, self._poll_wait = keys, poll_wait
        self.subscription: Subscription | None = None
        self.verifier: SetVerifier | None = None
        self._token: tuple[str, float] | None = None
        self._acks: list[str] = []
        self._errs: dict[str, dict[str, str]] = {}
        #: since start: SETs acted on, refused, and exceptions raised
        self.received = self.refused = self.raised = 0

    # ------------------------------------------------------------------ subscribing

    async def connect(self) -> Subscription:
        config = _dict(await self._json("GET", self.configuration), "the SSF configuration")
        issuer = config.get("issuer")
        if not isinstance(issuer, str) or configuration_url(issuer) != self.configuration:
            raise SignalError("the transmitter's issuer is not the one its URL was formed from")
        if POLL not in (config.get("delivery_methods_supported") or []):
            raise SignalError("the transmitter does not deliver by poll")
        endpoint, jwks_uri = config.get("configuration_endpoint"), config.get("jwks_uri")
        if not isinstance(endpoint, str) or not isinstance(jwks_uri, str):
            raise SignalError("the configuration has no configuration_endpoint or jwks_uri")
        self._same_origin(endpoint, issuer)
        metadata = _dict(await self._json("GET", metadata_url(issuer)), "the issuer's metadata")
        token_endpoint = metadata.get("token_endpoint")
        if metadata.get("issuer") != issuer or not isinstance(token_endpoint, str):
            raise SignalError("the issuer's metadata does not match or has no token_endpoint")
        self._token = None
        stream = await self._stream(issuer, token_endpoint, endpoint)
        delivery = stream.get("delivery") if isinstance(stream, dict) else None
        poll_url = delivery.get("endpoint_url") if isinstance(delivery, dict) else None
        stream_id = stream.get("stream_id") if isinstance(stream, dict) else None
        if not isinstance(poll_url, str) or not isinstance(stream_id, str):
            raise SignalError("the stream has no id or poll endpoint")
        if stream.get("iss") != issuer:  # SSF 1.0 §8.1.1.1-2: the receiver MUST check it
            raise SignalError("the transmitter's stream names another iss")
        self._same_origin(poll_url, issuer)
        if self._keys is None:
            try:
                trusted = TrustedIssuer(issuer, jwks_uri=jwks_uri)
            except ValueError as exc:
                raise SignalError(str(exc)) from None
            self._keys = IssuerKeys(trusted, self._fetcher)
        self.verifier = SetVerifier(
            issuer, self._auth.client_id, self._keys, critical=critical_members(config)
        )
        self.subscription = Subscription(issuer, token_endpoint, endpoint, stream_id, poll_url)
        log.info("reference_signals_subscribed", issuer=issuer, stream_id=stream_id)
        return self.subscription

    async def _stream(self, issuer: str, token_endpoint: str, endpoint: str) -> Any:
        body = {"delivery": {"method": POLL}, "events_requested": REQUESTED}
        return await find_or_create_stream(
            self._fetcher,
            endpoint,
            await self._bearer(issuer, token_endpoint),
            matches=lambda stream, delivery: (
                delivery.get("method") == POLL and stream.get("description") == DESCRIPTION
            ),
            body={**body, "description": DESCRIPTION},
            purpose=PURPOSE,
            error=SignalError,
        )

    async def _bearer(self, issuer: str, token_endpoint: str) -> dict[str, str]:
        if self._token is None or self._token[1] <= time.monotonic():
            form = {
                "grant_type": "client_credentials",
                "scope": "ssf:stream",
                "resource": f"{issuer.rstrip('/')}/ssf",
            }
            headers: dict[str, str] = {}
            self._auth.apply(form, headers)
            answer = _dict(
                await self._json("POST", token_endpoint, headers=headers, data=form),
                "the token answer",
            )
            token, lifetime = answer.get("access_token"), answer.get("expires_in", 60)
            if not isinstance(token, str):
                raise SignalError("the token endpoint answered without an access_token")
            lifetime = lifetime if isinstance(lifetime, int) else 60
            self._token = (token, time.monotonic() + max(5, lifetime - 30))
        return {"Authorization": f"Bearer {self._token[0]}"}

    # ------------------------------------------------------------------ polling

    async def poll_once(self) -> int:
        """One RFC 8936 poll: acknowledge the last round, take up to :data:`MAX_EVENTS` SETs, act
        on each. Returns how many SETs came."""
        sub = self.subscription or await self.connect()
        assert self.verifier is not None
        request = {
            "maxEvents": MAX_EVENTS,
            "returnImmediately": not self._poll_wait,
            "ack": self._acks,
            "setErrs": self._errs,
        }
        bearer = await self._bearer(sub.issuer, sub.token_endpoint)
        answer = await self._json(
            "POST",
            sub.poll_url,
            headers={**bearer, "Content-Type": "application/json"},
            content=orjson.dumps(request),
            max_bytes=MAX_POLL_BYTES,
            expect=(200, 401),
        )
        if answer is None:  # 401: the token expired early or was revoked; a new one next round
            self._token = None
            raise SignalError("the transmitter refused our token")
        self._acks, self._errs = [], {}
        sets = answer.get("sets") if isinstance(answer, dict) else None
        if not isinstance(sets, dict):
            raise SignalError("the poll answer has no sets object")
        for jti, token in sets.items():
            await self._handle(str(jti), token)
        return len(sets)

    async def _handle(self, jti: str, token: Any) -> None:
        assert self.verifier is not None
        try:
            if not isinstance(token, str):
                raise SetRefused("invalid_request", "the SET is not a compact JWS string")
            claims = await self.verifier.verify(token)
            found = signals_of(claims)
        except SetRefused as exc:
            log.warning("reference_signal_refused", jti=jti[:64], err=exc.err, reason=str(exc))
            self._errs[jti] = {"err": exc.err, "description": exc.description[:256]}
            self.refused += 1
            SETS.labels(outcome="refused").inc()
            return
        for signal in found:
            raised = len(await self._services.raise_on_signal(signal))
            self.raised += raised
            EXCEPTIONS.inc(raised)
        self._acks.append(jti)
        self.received += 1
        SETS.labels(outcome="acted").inc()

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll until ``stopping``; any failure (the transmitter, our store) is logged and retried
        with a capped backoff (0.5 s doubling to 30 s): the receiver never stops by itself."""
        backoff = 0.0
        while not stopping.is_set():
            polling = asyncio.ensure_future(self.poll_once())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({polling, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not polling.done():
                polling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await polling
                return
            error = polling.exception()
            if error is None:
                backoff = 0.0
                continue
            # what was handled before the failure stays in the acks of the next poll; the rest
            # of the round is delivered again. Subscribe afresh: the stream may be gone.
            backoff = min(max(backoff * 2, 0.5), 30.0)
            FAILURES.inc()
            log.warning("reference_signals_retry", error=repr(error)[:300], delay=backoff)
            self.subscription = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), backoff)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _same_origin(url: str, issuer: str) -> None:
        if _origin(url) != _origin(issuer):
            raise SignalError(f"{url[:200]} is not on the transmitter's origin")

    async def _json(self, method: str, url: str, **request: Any) -> Any:
        """The JSON answer, or :class:`SignalError`; None for a 401 when ``expect`` allows it."""
        return await request_json(
            self._fetcher, method, url, purpose=PURPOSE, error=SignalError, **request
        )


# ---------------------------------------------------------------------- from the settings


def client_auth(client_id: str, key_file: Path, kid: str | None, audience: str) -> PrivateKeyJwt:
    """``private_key_jwt`` with the EC P-256 key in ``key_file`` (``kid``: the one the client's
    registered JWKS gives it; default the key's RFC 7638 thumbprint)."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{key_file} is not an EC P-256 private key")
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(numbers.x.to_bytes(32, "big")),
        "y": b64url_encode(numbers.y.to_bytes(32, "big")),
    }
    return PrivateKeyJwt(client_id, key, kid or thumbprint(jwk), audience)


def build_receiver(
    settings: ReferenceSettings, services: TradeServices
) -> tuple[SignalReceiver, OutboundFetcher]:
    """The receiver the settings describe, and its fetcher (the caller closes it). The read
    timeout outlasts the transmitter's longest poll wait (``ssf_poll_wait``, at most 60 s)."""
    if (
        settings.ssf_configuration_url is None
        or settings.ssf_client_id is None
        or settings.ssf_client_key_file is None
    ):
        raise ValueError("TRUSTPLANE_REFERENCE_SSF_* do not name a transmitter and our client")
    issuer = issuer_of(settings.ssf_configuration_url)
    auth = client_auth(
        settings.ssf_client_id, settings.ssf_client_key_file, settings.ssf_client_kid, issuer
    )
    fetcher = OutboundFetcher(
        OutboundPolicy(
            allow_loopback=settings.ssf_allow_insecure_loopback,
            read_timeout=POLL_TIMEOUT,
            total_timeout=POLL_TIMEOUT,
        )
    )
    return SignalReceiver(services, settings.ssf_configuration_url, auth, fetcher), fetcher
