"""Shared pieces of the reference services' tests: the store on SQLite or PostgreSQL, a recording
PDP, a mandate registry the tests revoke by hand (the live issuer's introspection is exercised in
tests/e2e/test_settlement.py), and callers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from trustplane.authzen.model import Decision, Entity
from trustplane.reference import store as store_module
from trustplane.reference.entitlement import MandateStatus
from trustplane.reference.events import EventSigner
from trustplane.reference.services import Caller, TradeServices
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
