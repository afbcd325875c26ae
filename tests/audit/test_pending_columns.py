"""The pending row's leaf columns (migration 0028, docs/ledger.md "The pending row's leaf columns"):
the append writes the leaf's index columns on PostgreSQL and the sequencer's slice copies them
instead of parsing the entry. They must be exactly what the parse gave (``tables.leaf_value`` of
the entry's values: the ``sha256:`` digest of an over-long value, U+FFFD for a NUL or a lone
surrogate), and a pending row without them (written before the migration) must still integrate."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from sqlalchemy import select

from tests.audit.ledger_helpers import append, event
from trustplane.app import Services
from trustplane.audit import store
from trustplane.audit.sink import entry_row, leaf_columns, pending_row
from trustplane.audit.tables import LEAF_LIMITS, audit_leaves, audit_pending, leaf_value
from trustplane.audit_events import AuditEvent, AuditEventType

#: The leaf columns in the pending row's order.
COLUMNS = ("event_id", "type", "time_ms", "subject", "client_id", "partner", "transaction_id")

#: Odd values in every leaf field the append maps.
ODD: list[dict[str, Any]] = [
    {},
    {"subject": "a\x00b", "client_id": "\x00", "transaction_id": "txn-\\u0000-\x00"},
    {"subject": "Zürich 東京 \U0001f4b6", "partner": "señor-ünïcode", "client_id": "ç" * 128},
    {"subject": "é" * 256, "client_id": "ç" * 129, "partner": "\U0001f4b6" * 257},
    {"subject": "s" * 257, "client_id": "c" * 200, "transaction_id": "t" * 129},
    {"subject": "a\ud800b", "transaction_id": "\udfff" * 129, "partner": "p\x00" * 200},
    {"subject": "x" * 255 + "\x00", "client_id": "\x00" * 129, "partner": ""},
    {"subject": None, "client_id": None, "partner": None, "transaction_id": None},
    {"type": "x" * 70, "event_id": "e" * 33},
    {"subject": 'quote " and \\ backslash \n\t', "client_id": "\x1f\x7f"},
]


def parsed_columns(entry: str) -> dict[str, Any]:
    """What the sequencer gives the leaf from the entry itself (SQLite's path, and PostgreSQL's
    for a row without its columns)."""
    body = orjson.loads(entry)
    out = {c: leaf_value(body.get(c), n) for c, n in LEAF_LIMITS.items()}
    out["time_ms"] = body["time"]
    return out


def odd_event(n: int, fields: dict[str, Any]) -> AuditEvent:
    return event(n, **fields)


@pytest.mark.parametrize("fields", ODD)
def test_the_columns_are_what_the_parse_gives(fields: dict[str, Any]) -> None:
    row = pending_row(odd_event(1, fields))
    assert dict(zip(COLUMNS, row[3:], strict=True)) == parsed_columns(row[0])


def test_a_field_that_is_not_a_string_leaves_the_columns_to_the_parse() -> None:
    odd = event(1, subject=12345)
    assert leaf_columns(odd) == (None,) * 7
    assert leaf_columns(event(1))[1] == AuditEventType.TOKEN_ISSUED.value


async def _pending(services: Services) -> list[dict[str, Any]]:
    async with services.db.read() as conn:
        rows = await conn.execute(select(audit_pending).order_by(audit_pending.c.id))
        return [dict(r) for r in rows.mappings().all()]


async def _leaves(services: Services, after: int) -> list[dict[str, Any]]:
    async with services.db.read() as conn:
        rows = await conn.execute(
            select(audit_leaves).where(audit_leaves.c.idx >= after).order_by(audit_leaves.c.idx)
        )
        return [dict(r) for r in rows.mappings().all()]


async def _size(services: Services) -> int:
    await services.ledger.integrate_all()
    checkpoint = await services.ledger.checkpoint()
    return 0 if checkpoint is None else checkpoint.size


def _leaf(row: dict[str, Any]) -> dict[str, Any]:
    return {c: row[c] for c in COLUMNS}


async def test_the_append_writes_the_parsed_columns_and_the_leaves_are_the_same(
    services: Services,
) -> None:
    """PostgreSQL: every pending row carries the columns the parse gives; SQLite: none (its
    sequencer parses in Python). On both the integrated leaves are those of the parse."""
    start = await _size(services)
    await append(services.db, [odd_event(n, f) for n, f in enumerate(ODD)])
    pending = await _pending(services)
    assert len(pending) == len(ODD)
    pg = services.db.dialect == "postgresql"
    for row in pending:
        expected = parsed_columns(row["entry"]) if pg else dict.fromkeys(COLUMNS)
        assert _leaf(row) == expected
    assert await services.ledger.integrate_all() == len(ODD)
    leaves = await _leaves(services, start)
    assert [_leaf(leaf) for leaf in leaves] == [parsed_columns(r["entry"]) for r in pending]


async def test_pending_rows_without_columns_still_integrate(services: Services) -> None:
    """Rows as they were written before migration 0028 (entry, payload and salt only), in the
    same slices as rows with their columns, odd values included: the leaves are the parse's."""
    start = await _size(services)
    events = [odd_event(n, f) for n, f in enumerate(ODD * 2)]
    async with services.db.transaction() as conn:
        for n, e in enumerate(events):  # alternately old and new rows
            row = entry_row(e) if n % 2 else pending_row(e)
            await store.append_pending(conn, [row])
    pending = await _pending(services)
    assert await services.ledger.integrate_all() == len(events)
    leaves = await _leaves(services, start)
    assert [leaf["entry"] for leaf in leaves] == [r["entry"] for r in pending]
    assert [_leaf(leaf) for leaf in leaves] == [parsed_columns(r["entry"]) for r in pending]
