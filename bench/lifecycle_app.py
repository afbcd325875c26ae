"""The processes bench/lifecycle.py starts beside the authorization server: one reference service
(``build_app`` around its PEP, as docs/settlement.md "Running the services" shows), and the outbox
publisher to NATS JetStream.

A service: ``uvicorn --factory lifecycle_app:app_from_env`` with ``LC_AUDIENCE`` (the service's
audience: its PEP accepts only tokens for it), ``LC_ISSUER`` (the authorization server: JWKS, token
endpoint, introspection), ``LC_PDP`` (the AuthZEN PDP's base URL), ``LC_DATABASE_URL`` (the trade
store all services share; its schema made by the bench beforehand), ``LC_EVENT_KEY`` and
``LC_CLIENTS`` (a JSON file: the ``pdp`` and ``introspection`` clients' ids, kids and PEM keys).

The publisher: ``python lifecycle_app.py publish`` with ``LC_DATABASE_URL``, ``LC_EVENT_KEY``,
``LC_NATS_URL``, ``LC_NATS_PREFIX`` and ``LC_ACKS_FILE``: runs ``OutboxPublisher``; on SIGUSR1 it
appends the commit -> JetStream ack latencies since the last SIGUSR1 (one JSON list per line) to
``LC_ACKS_FILE``; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI

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
from trustplane.reference.entitlement import IntrospectionMandateCheck
from trustplane.reference.events import EventSigner
from trustplane.reference.http import build_app
from trustplane.reference.services import TradeServices
from trustplane.reference.store import TradeStore
from trustplane.storage.db import Database

EVENT_ISSUER = "https://reference.bench.invalid"


def _auth(entry: dict[str, Any], issuer: str) -> PrivateKeyJwt:
    key = serialization.load_pem_private_key(entry["pem"].encode(), password=None)
    return PrivateKeyJwt(entry["client_id"], key, entry["kid"], issuer)  # type: ignore[arg-type]


def _store() -> TradeStore:
    signer = EventSigner.from_file(EVENT_ISSUER, Path(os.environ["LC_EVENT_KEY"]))
    return TradeStore(Database(os.environ["LC_DATABASE_URL"]), signer)


def app_from_env() -> FastAPI:
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
    store = _store()
    pep = Pep(PolicyEnforcer(validator, decisions, realm=os.environ["LC_AUDIENCE"]))
    app = build_app(
        TradeServices(store, mandates), pep, IdempotencyService(SqlIdempotencyStore(store.db))
    )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def publish() -> None:
    from trustplane.reference.jetstream import OutboxPublisher

    store = _store()
    publisher = OutboxPublisher(
        store, os.environ["LC_NATS_URL"], prefix=os.environ["LC_NATS_PREFIX"]
    )
    acks = Path(os.environ["LC_ACKS_FILE"])
    stopping = asyncio.Event()

    def dump() -> None:
        latencies = list(publisher.ack_latencies)
        publisher.ack_latencies.clear()
        with acks.open("a") as handle:
            handle.write(json.dumps(latencies) + "\n")

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, dump)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    try:
        await publisher.run(stopping)
    finally:
        await publisher.close()
        await store.db.dispose()


if __name__ == "__main__":
    if sys.argv[1:] != ["publish"]:
        raise SystemExit("usage: lifecycle_app.py publish (the services run under uvicorn)")
    asyncio.run(publish())
