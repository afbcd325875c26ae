"""The processes bench/lifecycle.py starts beside the authorization server: one reference service
(``build_app`` around its PEP, as docs/settlement.md "Running the services" shows), and the outbox
publishers to NATS JetStream.

A service: ``uvicorn --factory lifecycle_app:app_from_env`` with ``LC_SERVICE`` (``execution``,
``allocation`` or ``settlement``: the owner this process runs, whose events it hands to the other
stores after each commit), ``LC_AUDIENCE`` (the service's audience: its PEP accepts only tokens for
it), ``LC_ISSUER`` (the authorization server: JWKS, token endpoint, introspection), ``LC_PDP`` (the
AuthZEN PDP's base URL), ``LC_DATABASE_URL_<SERVICE>`` (each service's own store, the four of
them; their schemas made by the bench beforehand), ``LC_EVENT_KEY`` (the base name of the owners'
event keys) and ``LC_CLIENTS`` (a JSON file: the ``pdp`` and ``introspection`` clients' ids, kids
and PEM keys).

``LC_PROFILE=<dir>`` (any process): cProfile on the process's CPU clock, dumped to
``<dir>/<service>.prof`` (``publisher.prof``) when it stops (docs/settlement.md, "Where a service
call's CPU goes"); the profiler slows a process about three times, so its run's rates and CPU
figures are not the bench's.

The publisher: ``python lifecycle_app.py publish`` with the same store settings, ``LC_NATS_URL``,
``LC_NATS_PREFIX`` and ``LC_ACKS_FILE``: runs an ``OutboxPublisher`` per owner, on uvloop; on SIGUSR1 it
appends the commit -> JetStream ack latencies since the last SIGUSR1 (one JSON list per line) to
``LC_ACKS_FILE``; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import signal
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from starlette.types import ASGIApp, Receive, Scope, Send

from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import (
    AuthzenClient,
    IdempotencyService,
    PolicyEnforcer,
    PrivateKeyJwt,
    SqlIdempotencyStore,
    TokenValidator,
    TrustedIssuer,
)
from trustplane.pep.http import Pep
from trustplane.reference import machine
from trustplane.reference.entitlement import IntrospectionMandateCheck
from trustplane.reference.http import build_app
from trustplane.reference.serve import dispatcher_of, dispose, open_stores
from trustplane.reference.services import ServiceStores, TradeServices
from trustplane.reference.settings import ReferenceSettings
from trustplane.server import freezing_when_started

EVENT_ISSUER = "https://reference.bench.invalid"


def _auth(entry: dict[str, Any], issuer: str) -> PrivateKeyJwt:
    key = serialization.load_pem_private_key(entry["pem"].encode(), password=None)
    return PrivateKeyJwt(entry["client_id"], key, entry["kid"], issuer)  # type: ignore[arg-type]


def store_settings(services: tuple[str, ...] = machine.SERVICES) -> ReferenceSettings:
    """Each service's store from ``LC_DATABASE_URL_<SERVICE>``; ``services``: those run here."""
    urls = tuple((s, os.environ[f"LC_DATABASE_URL_{s.upper()}"]) for s in machine.SERVICES)
    return ReferenceSettings(
        event_key_file=Path(os.environ["LC_EVENT_KEY"]), issuer=EVENT_ISSUER,
        service_database_urls=urls, services=services,
    )  # fmt: skip


def _stores(services: tuple[str, ...]) -> tuple[ServiceStores, ReferenceSettings]:
    settings = store_settings(services)
    return open_stores(settings), settings


def _profile() -> cProfile.Profile | None:
    """``LC_PROFILE`` set: cProfile on the process's CPU clock, started (a measuring aid: it
    slows the process several times)."""
    if not os.environ.get("LC_PROFILE"):
        return None
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    return profile


def _profiled(app: ASGIApp) -> ASGIApp:
    """``LC_PROFILE=<dir>``: cProfile on the process's CPU clock from start to the lifespan's
    shutdown, dumped to ``<dir>/<service>.prof`` (a measuring aid: it slows the process)."""
    profile = _profile()
    if profile is None:
        return app
    path = Path(os.environ["LC_PROFILE"]) / f"{os.environ['LC_SERVICE']}.prof"

    async def profiled(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                profile.disable()
                profile.dump_stats(str(path))
            await send(message)

        await app(scope, receive, sending)

    return profiled


def app_from_env() -> ASGIApp:
    issuer, pdp = os.environ["LC_ISSUER"], os.environ["LC_PDP"]
    clients = json.loads(Path(os.environ["LC_CLIENTS"]).read_text())
    fetcher = OutboundFetcher(OutboundPolicy.development())
    validator = TokenValidator(
        audience=os.environ["LC_AUDIENCE"], issuers=[TrustedIssuer(issuer)], fetcher=fetcher
    )
    decisions = AuthzenClient(
        pdp,
        token_endpoint=f"{issuer}/token",
        auth=_auth(clients["pdp"], issuer),
        audience=f"{issuer}/access/v1",  # the PDP is another server of the same deployment
        fetcher=fetcher,
    )
    mandates = IntrospectionMandateCheck(
        f"{issuer}/introspect", _auth(clients["introspection"], issuer), fetcher
    )
    stores, settings = _stores((os.environ["LC_SERVICE"],))
    pep = Pep(PolicyEnforcer(validator, decisions, realm=os.environ["LC_AUDIENCE"]))
    idempotency = {
        s: IdempotencyService(SqlIdempotencyStore(stores.by_service()[s].db))
        for s in machine.OWNERS
    }
    handoff = dispatcher_of(stores, settings.services)
    app = build_app(TradeServices(stores, mandates, handoff=handoff), pep, idempotency)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return _profiled(freezing_when_started(app))  # as `trustplane reference serve` runs it


async def publish() -> None:
    from trustplane.reference.jetstream import OutboxPublisher

    stores, _settings = _stores(machine.OWNERS)
    nats_url, prefix = os.environ["LC_NATS_URL"], os.environ["LC_NATS_PREFIX"]
    publishers = [
        OutboxPublisher(stores.by_service()[owner], nats_url, prefix=prefix)
        for owner in machine.OWNERS
    ]
    profile = _profile()
    acks = Path(os.environ["LC_ACKS_FILE"])
    stopping = asyncio.Event()

    def dump() -> None:
        latencies = [x for p in publishers for x in p.ack_latencies]
        for p in publishers:
            p.ack_latencies.clear()
        with acks.open("a") as handle:
            handle.write(json.dumps(latencies) + "\n")

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, dump)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    try:
        await asyncio.gather(*(p.run(stopping) for p in publishers))
    finally:
        for p in publishers:
            await p.close()
        await dispose(stores)
        if profile is not None:
            profile.disable()
            profile.dump_stats(str(Path(os.environ["LC_PROFILE"]) / "publisher.prof"))


if __name__ == "__main__":
    if sys.argv[1:] != ["publish"]:
        raise SystemExit("usage: lifecycle_app.py publish (the services run under uvicorn)")
    # on uvloop, as the publishers of `trustplane reference serve` run (in uvicorn's loop): the
    # stdlib loop's selector and socket writes were most of this process's CPU per event
    import uvloop

    uvloop.run(publish())
