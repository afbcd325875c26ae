"""Helpers shared by the ledger tests: append events, export the whole log, tamper as an operator
with database access would (dropping the append-only triggers first)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import text

from trustplane.audit import merkle
from trustplane.audit.ledger import Ledger, entry_record
from trustplane.audit.sink import write_events
from trustplane.audit.tables import APPEND_ONLY, append_only_ddl
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.storage.db import Database

ISSUER = "http://127.0.0.1:8000"


def event(n: int = 0, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "type": AuditEventType.TOKEN_ISSUED,
        "issuer": ISSUER,
        "subject": f"client-{n % 7}",
        "client_id": f"client-{n % 7}",
        "jti": uuid.uuid4().hex,
        "transaction_id": f"txn-{n % 5}",
        "decision": "allow",
        "payload": {"n": n, "email": f"trader{n}@northwind.example"},
    }
    values.update(fields)
    return AuditEvent(**values)


async def append(db: Database, events: list[AuditEvent]) -> None:
    async with db.transaction() as conn:
        await write_events(conn, events)


async def export(ledger: Ledger) -> tuple[list[dict[str, Any]], str]:
    """Every entry up to the latest checkpoint, and that checkpoint's note."""
    checkpoint = await ledger.checkpoint()
    assert checkpoint is not None
    records = [entry_record(e) async for e in ledger.iter_entries(0, checkpoint.size)]
    return records, checkpoint.note


async def drop_triggers(db: Database) -> None:
    """What an operator with full database access can do: the triggers are a guard, not the proof."""
    async with db.transaction() as conn:
        await _drop_guards(db, conn)


async def truncate_log(db: Database, keep: int) -> None:
    """Cut the log back to its first ``keep`` leaves, consistently (tree, state, checkpoints)."""
    await drop_triggers(db)
    async with db.transaction() as conn:
        ids = [int(r[0]) for r in (await conn.execute(text("SELECT id FROM audit_tree"))).all()]
        doomed = [
            i
            for i in ids
            if ((i & ((1 << merkle.LEVEL_SHIFT) - 1)) + 1) << (i >> merkle.LEVEL_SHIFT) > keep
        ]
        for doomed_id in doomed:
            await conn.execute(text("DELETE FROM audit_tree WHERE id = :i"), {"i": doomed_id})
        await conn.execute(text("DELETE FROM audit_leaves WHERE idx >= :k"), {"k": keep})
        await conn.execute(text("DELETE FROM audit_payloads WHERE idx >= :k"), {"k": keep})
        await conn.execute(text("DELETE FROM audit_checkpoints WHERE tree_size > :k"), {"k": keep})
        rows = (await conn.execute(text("SELECT id, hash FROM audit_tree"))).all()
        root = merkle.root_from_frontier({int(r[0]): bytes(r[1]) for r in rows}, keep)
        await conn.execute(
            text("UPDATE audit_log_state SET tree_size = :n, root = :r, updated_at = :t"),
            {"n": keep, "r": root, "t": int(time.time())},
        )


async def restore_triggers(db: Database) -> None:
    async with db.transaction() as conn:
        await _drop_guards(db, conn)
        for statement in append_only_ddl(db.dialect):
            await conn.exec_driver_sql(statement)


async def _drop_guards(db: Database, conn: Any) -> None:
    """Drop the append-only guards (SQLite triggers; the PostgreSQL trigger function, CASCADE)."""
    if db.is_sqlite:
        await drop_triggers_in(conn)
    else:
        await conn.execute(text("DROP FUNCTION IF EXISTS trustplane_ledger_append_only() CASCADE"))


async def drop_triggers_in(conn: Any) -> None:
    for table in APPEND_ONLY:
        for op in ("update", "delete"):
            await conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{op}"))
    await conn.execute(text("DROP TRIGGER IF EXISTS audit_payloads_no_update"))
