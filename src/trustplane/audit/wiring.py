"""The audit component: the sink every component appends events through, the ledger (its log key,
the background sequencer, retention) and the ledger's read API."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trustplane.audit.ingest import IngestService
from trustplane.audit.ledger import Ledger
from trustplane.audit.sink import SqlAuditSink
from trustplane.component import Idle, Routes
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.storage.writer import GroupCommitWriter

if TYPE_CHECKING:
    from trustplane.bearer_guard import BearerGuard
    from trustplane.clients.remote_jwks import RemoteJwksCache
    from trustplane.clients.service import ClientRegistry


@dataclass
class Audit(Idle):
    """Starts by creating the log key if there is none and integrating what an earlier run left
    pending; runs the sequencer in the background; maintenance purges payloads past retention.
    Closing integrates what is pending: it comes after the writer's close (later in the list means
    earlier at close), so what the writer flushed is in the log; if it fails the entries stay durable
    and the next start integrates them."""

    ledger: Ledger
    sink: SqlAuditSink
    settings: Settings
    db: Database
    guard: BearerGuard
    clients: ClientRegistry
    remote_jwks: RemoteJwksCache
    name = "audit"

    def routes(self) -> Routes:
        from trustplane.audit.http import IngestEndpoint, audit_router

        ingest = IngestEndpoint(
            IngestService(self.db, self.remote_jwks), self.guard, self.clients, self.settings,
            self.db,
        )  # fmt: skip
        return Routes(api=[audit_router(self.ledger, self.guard, self.settings, self.db, ingest)])

    async def start(self) -> None:
        await self.ledger.start()

    async def run(self, stopping: asyncio.Event) -> None:
        await self.ledger.run(stopping)

    async def maintain(self) -> None:
        await self.ledger.purge()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ledger.integrate_all()


def build(
    settings: Settings,
    db: Database,
    writer: GroupCommitWriter,
    kek: bytes,
    guard: BearerGuard,
    clients: ClientRegistry,
    remote_jwks: RemoteJwksCache,
) -> Audit:
    """``clients`` and ``remote_jwks``: whose keys an ingested event must verify with."""
    ledger = Ledger(settings, db, kek)
    return Audit(ledger, SqlAuditSink(writer), settings, db, guard, clients, remote_jwks)
