"""The shared-signals component: the SSF transmitter (every deployment) and receiver, their routes,
the push deliverer as its background loop, and the in-transaction hooks: the revocation observers
(a revoked token's SETs go into the outbox with the revocation; the tokens exchanged here from it are
revoked with it) and the audit-sink observer (tokens issued from another token are indexed with
their issuance record)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from trustplane.audit import sink
from trustplane.bearer_guard import RevokedTokens
from trustplane.component import Idle, Routes
from trustplane.federation.registry import PartnerRegistry
from trustplane.keys.service import KeyService
from trustplane.mandates.events import SecurityEvents
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.settings import Settings
from trustplane.ssf.receiver import Derivations, Receiver
from trustplane.ssf.subscriber import Subscriber
from trustplane.ssf.transmitter import Transmitter
from trustplane.storage.db import Database

if TYPE_CHECKING:
    from trustplane.bearer_guard import BearerGuard


@dataclass
class SharedSignals(Idle):
    transmitter: Transmitter
    receiver: Receiver
    derivations: Derivations
    subscriber: Subscriber
    guard: BearerGuard
    db: Database
    fetchers: tuple[OutboundFetcher, ...]
    name = "ssf"

    def routes(self) -> Routes:
        from trustplane.ssf.http import ssf_router

        return Routes(api=[ssf_router(self.transmitter, self.receiver, self.guard)])

    async def start(self) -> None:
        if self.derivations.observe not in sink.OBSERVERS:
            sink.OBSERVERS.append(self.derivations.observe)

    async def run(self, stopping: asyncio.Event) -> None:
        """The push deliverer and the partners' subscriptions, until shutdown."""
        await asyncio.gather(self.transmitter.run(stopping), self.subscriber.run(stopping))

    async def maintain(self) -> None:
        async with self.db.transaction() as conn:
            await self.derivations.prune(conn, int(time.time()))

    async def close(self) -> None:
        if self.derivations.observe in sink.OBSERVERS:
            sink.OBSERVERS.remove(self.derivations.observe)
        for fetcher in self.fetchers:
            await fetcher.aclose()


def build(
    settings: Settings,
    db: Database,
    keys: KeyService,
    revoked: RevokedTokens,
    partners: PartnerRegistry,
    guard: BearerGuard,
    mandate_events: SecurityEvents,
) -> SharedSignals:
    """Pushes go through their own guarded fetcher: public addresses only (loopback with
    ``ssf_allow_insecure_loopback``), no redirects, timeouts and size caps as every fetch; no
    per-host rate (a push is caused by a revocation, not by a caller, and a backlog must drain)."""
    policy = OutboundPolicy.from_settings(
        settings, allow_loopback=settings.ssf_allow_insecure_loopback
    )
    fetcher = OutboundFetcher(replace(policy, rate_per_host=0.0))
    transmitter = Transmitter(settings, db, keys, fetcher)
    revoked.observers.append(transmitter.on_revoked)
    mandate_events.observers.append(transmitter.on_mandate_event)
    receiver = Receiver(db, settings.issuer, partners, revoked, settings.clock_skew)
    revoked.observers.append(receiver.on_revoked)  # a local revocation reaches derived tokens
    derivations = Derivations(settings.issuer)
    # subscriptions: partners' issuers (http on loopback only as federation allows it)
    partner_fetcher = OutboundFetcher(
        OutboundPolicy.from_settings(
            settings, allow_loopback=settings.federation_allow_insecure_loopback
        )
    )
    subscriber = Subscriber(
        settings.issuer,
        receiver.endpoint,
        partners,
        keys,
        partner_fetcher,
        settings.ssf_subscribe_interval,
        learned=receiver.learn_configuration,
    )
    return SharedSignals(
        transmitter, receiver, derivations, subscriber, guard, db, (fetcher, partner_fetcher)
    )
