"""PostgreSQL: the sequencer's "is anything pending?" poll is one statement on the wire, with no
transaction around it (a pooled connection's ``BEGIN`` and ``ROLLBACK`` would be two more round
trips for a one-row read)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from tests.audit.ledger_helpers import append
from tests.conftest import make_settings
from trustplane.audit import store
from trustplane.audit.ledger import Ledger
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.keys.wiring import key_encryption_key
from trustplane.storage.db import Database

pytestmark = pytest.mark.postgres


def _wire(db: Database) -> list[str]:
    """The first word of every statement sent from now on, on either engine: SQLAlchemy's, and
    what asyncpg sends on its own (``BEGIN``, ``ROLLBACK``: its query logger)."""
    sent: list[str] = []

    def log(query: str) -> None:
        sent.append(query.split()[0].upper().rstrip(";"))

    def connected(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.driver_connection.add_query_logger(lambda record: log(record.query))

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        log(statement)

    for engine in (db.engine, db.autocommit_engine):
        event.listen(engine.sync_engine, "connect", connected)
        event.listen(engine.sync_engine, "before_cursor_execute", executed)
    return sent


async def test_a_round_with_nothing_pending_is_one_statement(pg_url: str, tmp_path: Path) -> None:
    """Fails on the old code: ``BEGIN``, the ``SELECT``, ``ROLLBACK``."""
    settings = make_settings(pg_url, tmp_path)
    db = Database(pg_url)
    ledger = Ledger(settings, db, key_encryption_key(settings))
    try:
        await ledger.start()  # the log key made, what was pending integrated
        await ledger.integrate()  # both engines initialised (their first connection's queries)
        await db.dispose()  # the pools start empty: every connection from here is logged
        sent = _wire(db)
        assert await ledger.integrate() is None
        polls = list(sent)
        await append(db, [AuditEvent(type=AuditEventType.TOKEN_ISSUED, issuer="i", jti="t")])
        done = await ledger.integrate()
    finally:
        await db.dispose()

    assert polls == ["SELECT"]
    assert done is not None
    assert done.count == 1


async def test_a_round_after_local_appends_reads_its_batch_without_polling_first(
    pg_url: str, tmp_path: Path
) -> None:
    """The loop's round after this process appended goes straight to its transaction: no "anything
    pending?" statement first (under load every round is one; fails on the old code)."""
    settings = make_settings(pg_url, tmp_path, audit_integrate_interval=1.0)
    db = Database(pg_url)
    ledger = Ledger(settings, db, key_encryption_key(settings))
    stopping = asyncio.Event()
    try:
        await ledger.start()
        await ledger.integrate()  # both engines initialised
        await db.dispose()
        sent: list[str] = []
        for engine in (db.engine, db.autocommit_engine):
            event.listen(
                engine.sync_engine,
                "connect",
                lambda c, _r: c.driver_connection.add_query_logger(lambda q: sent.append(q.query)),
            )
        loop = asyncio.create_task(ledger.run(stopping, idle=3600))
        await asyncio.sleep(0.1)  # the loop asleep for its idle poll (an hour)
        first = await ledger.checkpoint()
        assert first is not None
        size = first.size
        del sent[:]
        await append(db, [AuditEvent(type=AuditEventType.TOKEN_ISSUED, issuer="i", jti="u")])
        for _ in range(200):  # woken by the append: integrated well before the next round
            await asyncio.sleep(0.02)
            latest = await ledger.checkpoint()
            if latest is not None and latest.size > size:
                break
        stopping.set()
        await loop
    finally:
        await db.dispose()
    assert latest is not None
    assert latest.size == size + 1
    assert store.PG_HAS_PENDING_SQL not in sent
