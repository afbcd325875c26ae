"""Shared pieces of the reference services' tests: the store on SQLite or PostgreSQL, a recording
PDP, a mandate registry the tests revoke by hand (the live issuer's introspection is exercised in
tests/e2e/test_settlement.py), and callers."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from tests.conftest import PG_ADMIN_URL, pg_admin, require_service, run_sync
from trustplane.authzen.model import Decision, Entity
from trustplane.reference import machine
from trustplane.reference import store as store_module
from trustplane.reference.entitlement import MandateStatus
from trustplane.reference.events import EventSigner
from trustplane.reference.handoff import Dispatcher, Upstream
from trustplane.reference.services import Caller, ServiceStores, TradeServices
from trustplane.reference.store import TradeStore
from trustplane.storage.db import Database

MANDATE = {"id": "M-1", "version": 1}
#: The issuer of the callers' tokens (their ``iss``; each caller's token ``jti`` is ``tok-<subject>``).
ISSUER = "https://as.example"
ORDER = {
    "account": "ACC-1",
    "instrument": "XS0000000001",
    "side": "buy",
    "quantity": "1000",
    "amount": "1000000",
    "currency": "EUR",
}


@dataclass
class RecordingPdp:
    """Allows everything except the actions in ``deny``; keeps every decision it made."""

    deny: set[str] = field(default_factory=set)
    decisions: list[tuple[str, Decision, dict[str, Any]]] = field(default_factory=list)

    async def decide(self, action: str, resource: Entity, context: Mapping[str, Any]) -> Decision:
        allowed = action not in self.deny and context.get("mandate_active", True) is not False
        decision = Decision(
            allowed, ("test-permit",) if allowed else ("test-forbid",), "bundle-7", uuid.uuid4().hex
        )
        self.decisions.append((action, decision, dict(context)))
        return decision


@dataclass
class Mandates:
    """The mandates' status as the issuer would report it: ``revoked`` ids are not usable."""

    revoked: set[str] = field(default_factory=set)
    asked: int = 0

    async def check(
        self, token: str | None, claims: Mapping[str, Any], trade_envelope: Mapping[str, Any]
    ) -> MandateStatus:
        self.asked += 1
        mandate = trade_envelope.get("mandate")
        if isinstance(mandate, dict) and mandate.get("id") in self.revoked:
            return MandateStatus(False, "mandate_not_usable", "revoked", mandate)
        return MandateStatus(True, "active", "usable", mandate)


def caller(subject: str, pdp: RecordingPdp, **claims: Any) -> Caller:
    base = {
        "iss": ISSUER,
        "jti": f"tok-{subject}",
        "sub": subject,
        "client_id": "desk-app",
        "txn": "txn-1",
        "mandate": MANDATE,
        "act": {"sub": "arranger-svc", "act": {"sub": "origin"}},
        "authorization_details": [{"type": "order", "amount": "1000000"}],
    }
    base.update(claims)
    return Caller(subject, base, "raw-token", pdp.decide)


async def fresh_store(url: str) -> TradeStore:
    store = TradeStore(Database(url), EventSigner.generate("https://settle.example"))
    await store.create_schema()
    async with store.db.transaction() as conn:
        for table in reversed(store_module.metadata.sorted_tables):
            await conn.execute(delete(table))
    return store


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def ref_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'reference.db'}"
    else:
        yield request.getfixturevalue("pg_database")


@dataclass
class World:
    store: TradeStore
    services: TradeServices
    pdp: RecordingPdp
    mandates: Mandates


@pytest.fixture
async def world(ref_url: str) -> AsyncIterator[World]:
    store = await fresh_store(ref_url)
    pdp, mandates = RecordingPdp(), Mandates()
    yield World(store, TradeServices(store, mandates), pdp, mandates)
    await store.db.dispose()


#: The deployment's issuer of the services' events (each owner signs with its own key).
EVENTS_ISSUER = "https://settle.example"
#: The last step through which each upstream owner's store learns a trade's history: what its
#: own decisions read (``machine.concerns``); settlement and reporting learn all of it.
LAST_STEP = {machine.EXECUTION: "execute", machine.ALLOCATION: "approve_allocation"}


def held(service: str, names: list[str]) -> list[str]:
    """What ``service``'s store holds of a history along the path (``names``, in order)."""
    last = LAST_STEP.get(service)
    return names if last is None or last not in names else names[: names.index(last) + 1]


async def split_stores(urls: Mapping[str, str]) -> ServiceStores:
    """One store per service on ``urls`` (emptied), each owner with its own event key."""
    stores: dict[str, TradeStore] = {}
    for service in machine.SERVICES:
        signer = EventSigner.generate(EVENTS_ISSUER) if service in machine.OWNERS else None
        store = TradeStore(Database(urls[service]), signer, service=service)
        await store.create_schema()
        async with store.db.transaction() as conn:
            for table in reversed(store_module.metadata.sorted_tables):
                await conn.execute(delete(table))
        stores[service] = store
    return ServiceStores(**stores)


def upstreams(stores: ServiceStores) -> list[Upstream]:
    owners = stores.by_service()
    return [Upstream(s, owners[s], EVENTS_ISSUER, owners[s].signer.jwks()) for s in machine.OWNERS]


@pytest.fixture(scope="session")
def pg_service_databases() -> Iterator[dict[str, str]]:
    """One throw-away PostgreSQL database per service for this session (the reference tables are
    made by the stores themselves)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    base = f"tp_ref_{os.getpid()}_{secrets.token_hex(3)}"
    urls = {}
    for service in machine.SERVICES:
        run_sync(pg_admin(f'CREATE DATABASE "{base}_{service}"'))
        urls[service] = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{base}_{service}"
    yield urls
    for service in machine.SERVICES:
        run_sync(pg_admin(f'DROP DATABASE IF EXISTS "{base}_{service}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def split_urls(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        return {
            s: f"sqlite+aiosqlite:///{tmp_path / f'reference-{s}.db'}" for s in machine.SERVICES
        }
    urls: dict[str, str] = request.getfixturevalue("pg_service_databases")
    return urls


@dataclass
class SplitWorld:
    """The four services, each on its own store, and the embedded hand-off between them."""

    stores: ServiceStores
    services: TradeServices
    dispatcher: Dispatcher
    pdp: RecordingPdp
    mandates: Mandates


@asynccontextmanager
async def split_world(urls: Mapping[str, str]) -> AsyncIterator[SplitWorld]:
    """The four owners' stores on ``urls`` with the hand-off between them (disposed after)."""
    stores = await split_stores(urls)
    dispatcher = Dispatcher.between(stores.by_service(), upstreams(stores))
    pdp, mandates = RecordingPdp(), Mandates()
    services = TradeServices(stores, mandates, handoff=dispatcher)
    try:
        yield SplitWorld(stores, services, dispatcher, pdp, mandates)
    finally:
        for store in stores.distinct():
            await store.db.dispose()


@pytest.fixture
async def split(split_urls: dict[str, str]) -> AsyncIterator[SplitWorld]:
    async with split_world(split_urls) as world:
        yield world
