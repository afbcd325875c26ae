"""The outbox forwarder to the authorization server's ledger, against a real server on loopback
(the app served by uvicorn): the ledger down, then up (retried, nothing lost, in order); a forwarder
killed between the ledger's answer and the mark (re-sent, duplicates, nothing twice); a tampered row
stops it at that row with the ledger's reason; the JetStream marker is untouched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import uvicorn
from sqlalchemy import update

from tests.audit.test_ingest import service
from tests.conftest import EXECUTION, PROTOCOL_DATABASES, free_port, new_ec_key
from tests.protocol_server import Server, running_server
from tests.reference.conftest import ORDER, Mandates, RecordingPdp, caller
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import PrivateKeyJwt
from trustplane.reference.events import EventSigner
from trustplane.reference.ledger_forwarder import LedgerForwarder, LedgerRefused, LedgerUnavailable
from trustplane.reference.services import EntitlementLost, TradeServices
from trustplane.reference.store import TradeStore, outbox
from trustplane.storage.db import Database

pytestmark = pytest.mark.asyncio(loop_scope="module")
SERVICE = EXECUTION  # the events' iss: the audience the service's client is resource server for


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROTOCOL_DATABASES)
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    """The in-process server with the issuer of the loopback port it is served on (later)."""
    port = free_port()
    async with running_server(request, tmp_path_factory, issuer=f"http://127.0.0.1:{port}") as s:
        yield s


async def serve(server: Server) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """The server's app on its issuer's port (its lifespan already runs in the fixture)."""
    app: Any = server.http._transport.app  # type: ignore[attr-defined]
    port = int(server.issuer.rsplit(":", 1)[1])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", ws="none", log_level="critical"
    )
    web = uvicorn.Server(config)
    task = asyncio.create_task(web.serve())
    while not web.started:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    return web, task


async def trade_events(tmp: Path) -> tuple[TradeStore, str]:
    """A lifecycle with an exception and its re-consent: 6 events under one transaction."""
    signer = EventSigner(SERVICE, new_ec_key())
    store = TradeStore(Database(f"sqlite+aiosqlite:///{tmp / 'ref.db'}"), signer)
    await store.create_schema()
    pdp, mandates = RecordingPdp(), Mandates()
    services = TradeServices(store, mandates)
    desk = caller("alice", pdp)
    trade = await services.create_order(desk, ORDER, "k1")
    await services.execute(caller("broker", pdp), trade.trade_id, "k2")
    await services.propose_allocation(
        desk, trade.trade_id, [{"account": "A", "quantity": "1000"}], "k3"
    )
    await services.approve_allocation(caller("bob", pdp), trade.trade_id, "k4")
    mandates.revoked.add("M-1")
    with pytest.raises(EntitlementLost) as lost:
        await services.submit_settlement(
            caller("clearing", pdp), trade.trade_id, {"ssi": "X"}, "k5"
        )
    await services.resolve_exception(
        caller("ops", pdp, scope="exception:resolve"),
        lost.value.exception.exception_id,
        "reconsent",
    )
    return store, "txn-1"


async def in_ledger(server: Server, txn: str) -> list[dict[str, Any]]:
    await server.services.ledger.integrate_all()
    _, found = await server.services.ledger.search({"transaction_id": txn}, 0, 1000)
    entries = [orjson.loads(p.entry.entry) for p in found]
    return [e for e in entries if e["type"].startswith("trade:") and e["issuer"] == SERVICE]


async def test_the_ledger_down_then_up_nothing_lost_nothing_twice(
    server: Server, tmp_path: Path
) -> None:
    store, txn = await trade_events(tmp_path)
    kit, _ = await service(server, store.signer)
    fetcher = OutboundFetcher(OutboundPolicy.development(connect_timeout=0.5, total_timeout=2.0))
    auth = PrivateKeyJwt(kit.client_id, kit.key, kit.kid, server.issuer)
    forwarder = LedgerForwarder(store, server.issuer, auth, fetcher, batch=4)
    rows = await store.events_after(0, 100)
    assert len(rows) == 6
    try:
        # nothing listens on the issuer's port yet: refused, nothing marked
        with pytest.raises(LedgerUnavailable):
            await forwarder.drain_once()
        assert len(await store.undelivered_to_ledger()) == 6
        stopping = asyncio.Event()
        running = asyncio.create_task(forwarder.run(stopping, idle=0.05, max_backoff=0.2))
        deadline = time.monotonic() + 30
        while forwarder.failures < 3:  # it retries (and backs off) while the ledger is down
            assert time.monotonic() < deadline, "the forwarder did not retry"
            await asyncio.sleep(0.02)
        assert len(await store.undelivered_to_ledger()) == 6
        web, task = await serve(server)
        try:
            deadline = time.monotonic() + 30
            while await store.undelivered_to_ledger():
                assert time.monotonic() < deadline, "the forwarder did not drain the outbox"
                await asyncio.sleep(0.05)
            stopping.set()
            await running
            entries = await in_ledger(server, txn)
            assert [e["jti"] for e in entries] == [r.event_id for r in rows]  # all, in order, once
            assert entries[4]["type"] == "trade:settlement:exception"
            assert entries[5]["type"] == "trade:exception:resolved"
            assert not any(r.published for r in await store.events_after(0, 100))  # JetStream's

            # killed between the ledger's answer and the mark: the rows are sent again
            async with store.db.transaction() as conn:
                await conn.execute(update(outbox).values(ledger_at=None))
            assert await forwarder.forward_all() == 6
            assert len(await in_ledger(server, txn)) == 6

            # a tampered row: the ledger refuses it, the forwarder stops there with the reason
            await services_more(store)
            newest = await store.events_after(6, 100)
            head, body, sig = newest[1].jws.split(".")
            async with store.db.transaction() as conn:
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.seq == newest[1].seq)
                    .values(jws=f"{head}.{body}.{sig[:-4]}AAAA")
                )
            with pytest.raises(LedgerRefused) as refused:
                await forwarder.forward_all()
            assert refused.value.event_id == newest[1].event_id
            assert (
                "event 0: the signature does not verify with the client's registered keys"
                in str(refused.value)
            )
            # the one before it was delivered, the refused one stays in the outbox
            assert [r.seq for r in await store.undelivered_to_ledger()] == [newest[1].seq]
            assert [e["jti"] for e in await in_ledger(server, "txn-2")] == [newest[0].event_id]
        finally:
            web.should_exit = True
            await task
    finally:
        await fetcher.aclose()
        await store.db.dispose()


async def services_more(store: TradeStore) -> None:
    """Two more events (a second trade created and executed) after the six."""
    pdp = RecordingPdp()
    services = TradeServices(store, Mandates())
    trade = await services.create_order(caller("alice", pdp, txn="txn-2"), ORDER, "k9")
    await services.execute(caller("broker", pdp, txn="txn-2"), trade.trade_id, "k10")
