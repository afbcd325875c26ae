"""The receiver's subscriptions: for every active partner whose trust profile names its SSF
transmitter and our client id there (``ssf.configuration_url``, ``ssf.client_id``), make sure a push
stream to our receiver endpoint exists at the partner.

One round per partner: fetch the transmitter configuration (its ``issuer`` must be one of the
partner's issuers, SSF 1.0 §7.2) and the partner's OAuth metadata (RFC 8414) for its token endpoint;
get an access token for ``{issuer}/ssf`` with scope ``ssf:stream`` by client credentials,
authenticating with ``private_key_jwt`` signed by our deployment's active signing key (the partner
registered our client with our ``jwks_uri``, so our key rotation needs nothing from them); list our
streams there and create a push stream (RFC 8935) for ``session-revoked`` and
``token-claims-change`` to ``{our issuer}/ssf/receiver`` unless one exists. The configuration's
``critical_subject_members`` go to the receiver (``learned``). Every request goes
through the guarded fetcher. A partner that fails is retried at the next round (``ssf_subscribe_
interval``); a new or changed profile is picked up when the registry reloads.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from trustplane.federation.profile import TrustProfile
from trustplane.federation.registry import PartnerRegistry
from trustplane.keys.service import KeyService
from trustplane.outbound import OutboundFetcher
from trustplane.ssf.client import find_or_create_stream, request_json
from trustplane.ssf.transmitter import (
    PUSH,
    SESSION_REVOKED,
    TOKEN_CLAIMS_CHANGE,
    issuers_of_configuration,
)

log = structlog.get_logger("trustplane.ssf")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
REQUESTED = [SESSION_REVOKED, TOKEN_CLAIMS_CHANGE]
PURPOSE = "ssf_subscribe"


class SubscriptionError(Exception):
    """One partner's subscription round failed (logged; retried next round)."""


@dataclass(frozen=True, slots=True)
class Subscription:
    partner_id: str
    #: the profile version it was made for (a new version subscribes again)
    version: int
    stream_id: str | None
    error: str | None = None


class Subscriber:
    def __init__(
        self,
        issuer: str,
        receiver_endpoint: str,
        partners: PartnerRegistry,
        keys: KeyService,
        fetcher: OutboundFetcher,
        interval: float,
        *,
        learned: Callable[[TrustProfile, Any], None] | None = None,
    ) -> None:
        """``learned``: told each partner's transmitter configuration once checked (the receiver
        keeps its ``critical_subject_members``)."""
        self._issuer, self._endpoint = issuer, receiver_endpoint
        self._partners, self._keys, self._fetcher = partners, keys, fetcher
        self._interval = interval
        self._learned = learned
        self.subscriptions: dict[str, Subscription] = {}

    async def run(self, stopping: asyncio.Event) -> None:
        """A round at start, at every registry reload and every ``interval`` seconds; asleep
        in between (it waits on the reload, not on a short poll of the registry)."""
        seen = -1
        next_round = 0.0
        reloaded = self._partners.reloaded
        while not stopping.is_set():
            reloaded.clear()  # before the look: a reload from here on wakes the wait below
            now = time.monotonic()
            if self._partners.generation != seen or now >= next_round:
                seen = self._partners.generation
                next_round = now + self._interval
                await self.round()
                continue  # a reload during the round is seen by the next look
            waits = [asyncio.ensure_future(e.wait()) for e in (stopping, reloaded)]
            try:
                await asyncio.wait(
                    waits, timeout=next_round - now, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiting in waits:
                    waiting.cancel()

    async def round(self) -> None:
        """Subscribe where a profile asks for it and no stream is known for its version."""
        for partner in self._partners.profiles():
            if not (partner.active and partner.ssf_configuration and partner.ssf_client_id):
                self.subscriptions.pop(partner.partner_id, None)
                continue
            known = self.subscriptions.get(partner.partner_id)
            if known is not None and known.version == partner.version and known.stream_id:
                continue
            try:
                stream_id = await self.subscribe(partner)
            except SubscriptionError as exc:
                log.warning("ssf_subscribe_failed", partner=partner.partner_id, error=str(exc))
                self.subscriptions[partner.partner_id] = Subscription(
                    partner.partner_id, partner.version, None, str(exc)[:300]
                )
                continue
            self.subscriptions[partner.partner_id] = Subscription(
                partner.partner_id, partner.version, stream_id
            )
            log.info("ssf_subscribed", partner=partner.partner_id, stream_id=stream_id)

    async def subscribe(self, partner: TrustProfile) -> str:
        if partner.ssf_configuration is None or partner.ssf_client_id is None:
            raise SubscriptionError("the trust profile names no transmitter or client id")
        config = await self._json("GET", partner.ssf_configuration)
        issuer = config.get("issuer")
        if issuer not in partner.issuers:
            raise SubscriptionError("the transmitter's issuer is not one of the partner's issuers")
        if issuer not in issuers_of_configuration(partner.ssf_configuration):
            # SSF 1.0 §7.2.4: MUST be the issuer the configuration URL was formed from
            raise SubscriptionError("the transmitter's issuer is not the one its URL names")
        if self._learned is not None:
            self._learned(partner, config)
        if PUSH not in (config.get("delivery_methods_supported") or []):
            raise SubscriptionError("the transmitter does not deliver by push")
        endpoint = config.get("configuration_endpoint")
        if not isinstance(endpoint, str):
            raise SubscriptionError("the transmitter has no configuration_endpoint")
        metadata = await self._json(
            "GET", f"{str(issuer).rstrip('/')}/.well-known/oauth-authorization-server"
        )
        token_endpoint = metadata.get("token_endpoint")
        if not isinstance(token_endpoint, str):
            raise SubscriptionError("the partner's metadata has no token_endpoint")
        token = await self._token(str(issuer), token_endpoint, partner.ssf_client_id)
        body = {
            "delivery": {"method": PUSH, "endpoint_url": self._endpoint},
            "events_requested": REQUESTED,
            "description": f"trustplane receiver {self._issuer}"[:256],
        }
        stream = await find_or_create_stream(
            self._fetcher,
            endpoint,
            {"Authorization": f"Bearer {token}"},
            matches=lambda _, delivery: delivery.get("endpoint_url") == self._endpoint,
            body=body,
            purpose=PURPOSE,
            error=SubscriptionError,
        )
        stream_id = stream.get("stream_id") if isinstance(stream, dict) else None
        if not isinstance(stream_id, str):
            raise SubscriptionError("the transmitter's stream has no id")
        if stream.get("iss") != issuer:  # SSF 1.0 §8.1.1.1-2: the receiver MUST check it
            raise SubscriptionError("the transmitter's stream names another iss")
        return stream_id

    async def _token(self, issuer: str, token_endpoint: str, client_id: str) -> str:
        now = int(time.time())
        assertion = (
            self._keys.ring.require_signer()
            .with_typ("JWT")
            .sign(
                {
                    "iss": client_id,
                    "sub": client_id,
                    "aud": issuer,
                    "iat": now,
                    "exp": now + 60,
                    "jti": secrets.token_hex(16),
                }
            )
        )
        form = {
            "grant_type": "client_credentials",
            "scope": "ssf:stream",
            "resource": f"{issuer.rstrip('/')}/ssf",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
        answer = await self._json("POST", token_endpoint, data=form, expect=(200,))
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str):
            raise SubscriptionError("the token endpoint answered without an access_token")
        return token

    async def _json(self, method: str, url: str, **request: Any) -> Any:
        return await request_json(
            self._fetcher, method, url, purpose=PURPOSE, error=SubscriptionError, **request
        )
