"""Recording decisions: the audit event (identifiers only) plus, in ``policy_decisions``, the inputs
simulation needs to replay the decision (the Cedar request and the entities it was evaluated with).

Both are written in one transaction: through the group-commit writer for :meth:`PolicyEngine.decide`,
or inside the token endpoint's own outcome transaction (``oauth.outcomes``), so a token request pays
for no extra write.

On PostgreSQL a writer batch of decisions alone (the PDP's common case) is one statement on the
writer's autocommit connection (:func:`write_alone`): the ``policy_decisions`` insert as a
data-modifying CTE of the ledger's pending insert, atomic and durable when it returns
(``synchronous_commit`` on), one round trip instead of ``BEGIN``, the statement and ``COMMIT``. A
batch whose events an audit-sink observer would write for runs the transactional way. A batch of
one decision (a PDP asked one question at a time: the lifecycle's case), as every batch of up to
``storage.driver_sql.VALUES_ROWS``, binds scalar parameters (``VALUES``) instead of one array per
column: neither asyncpg nor the server then packs, unpacks and unnests one-element arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit import sink
from trustplane.audit.sink import (
    observers_write_nothing,
    pending_row,
    write_events,
)
from trustplane.audit.store import pg_pending_insert
from trustplane.audit_events import AuditEvent
from trustplane.policy.tables import policy_decisions
from trustplane.storage.driver_sql import in_transaction, insert_rows, values_clause
from trustplane.storage.writer import GroupCommitWriter

KIND = "policy_decision"
#: ``policy_decisions.correlation_id``'s length (the other columns are cut to theirs in ``row``)
CORRELATION_ID_CHARS: int = policy_decisions.c.correlation_id.type.length  # type: ignore[attr-defined]
#: (column, PostgreSQL type) in the order of :meth:`DecisionRecord.row`.
_TYPED = (
    ("decision_id", "text"),
    ("time_ms", "bigint"),
    ("bundle_version", "text"),
    ("action", "text"),
    ("principal", "text"),
    ("resource", "text"),
    ("allowed", "boolean"),
    ("reason_ids", "text"),
    ("latency_us", "integer"),
    ("correlation_id", "text"),
    ("inputs", "text"),
)
_COLUMNS = tuple(name for name, _ in _TYPED)


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision to make durable. ``inputs`` is the replayable input as JSON text (serialised once,
    so a cached decision recorded again reuses it), or None when the request never reached the
    engine (it could not be built) and there is nothing to replay."""

    event: AuditEvent
    action: str
    resource: str
    latency_us: int
    inputs: str | None

    def row(self) -> tuple[Any, ...]:
        e = self.event
        return (
            e.event_id,
            e.time,
            e.policy_bundle_version or "none",
            self.action[:64],
            (e.subject or "")[:300],
            self.resource[:300],
            e.decision == "allow",
            " ".join(e.reason_ids)[:500],
            self.latency_us,
            # the column's length: a longer X-Request-ID or correlation_id (AuthZEN takes 256)
            # failed the group commit, and every decision of its batch was not recorded
            e.correlation_id[:CORRELATION_ID_CHARS] if e.correlation_id else None,
            self.inputs,
        )


@functools.lru_cache(maxsize=4)
def _insert_sql(dialect: str) -> str:
    values = values_clause(dialect, len(_COLUMNS), 1)
    return f"INSERT INTO policy_decisions ({', '.join(_COLUMNS)}) VALUES {values}"  # noqa: S608 - constants


async def write_decisions(conn: AsyncConnection, records: Sequence[DecisionRecord]) -> list[None]:
    """Write audit events and decision inputs in the caller's transaction (and batch handler).
    PostgreSQL, in a transaction: one statement for both (the inputs' insert as a CTE of the
    ledger's, sent to asyncpg directly); SQLite: two ``executemany``."""
    if records:
        events = [r.event for r in records]
        if await in_transaction(conn) is not None:
            await write_events(conn, events, alongside=pg_inputs_insert(records, first=1))
        else:
            await write_events(conn, events)
            await write_inputs(conn, records)
    return [None] * len(records)


async def write_inputs(conn: AsyncConnection, records: Sequence[DecisionRecord]) -> None:
    """Only the ``policy_decisions`` rows, for a caller that appends the records' audit events
    with its own (``oauth.outcomes``: one ledger insert per batch)."""
    rows = [r.row() for r in records]
    if conn.dialect.name == "postgresql":
        sql, params = insert_rows("policy_decisions", _TYPED, rows)
        driver = await in_transaction(conn)
        if driver is not None:
            await driver.execute(sql, *params)
        else:
            await conn.exec_driver_sql(sql, tuple(params))
    else:
        await conn.exec_driver_sql(_insert_sql(conn.dialect.name), rows)


def pg_inputs_insert(records: Sequence[DecisionRecord], first: int) -> tuple[str, Sequence[Any]]:
    """PostgreSQL: :func:`write_inputs`'s insert and its parameters, numbered from ``first``, for
    a caller that runs it inside a statement of its own (``grant.outcomes``: as a CTE of the
    replay upsert, one execution for both)."""
    return insert_rows("policy_decisions", _TYPED, [r.row() for r in records], first=first)


async def _write_batches(
    conn: AsyncConnection, batches: Sequence[Sequence[DecisionRecord]]
) -> list[None]:
    await write_decisions(conn, [r for batch in batches for r in batch])
    return [None] * len(batches)


@functools.lru_cache(maxsize=64)
def _alone_sql(inputs: str, pending: str) -> str:
    """A text per batch size (up to ``VALUES_ROWS`` decisions, then one for every larger)."""
    return f"WITH inputs AS ({inputs}) {pending}"


async def write_alone(
    conn: AsyncConnection, batches: Sequence[Sequence[DecisionRecord]]
) -> list[None] | None:
    """The writer's single-statement handler (PostgreSQL, a batch of decision records alone, on
    its autocommit connection): the replay inputs and the ledger's pending rows in one statement,
    committed when it returns. None, with nothing written: an audit-sink observer would write for
    these events (in the transaction :func:`_write_batches` opens)."""
    records = [r for batch in batches for r in batch]
    events = [r.event for r in records]
    if sink.OBSERVERS and not await observers_write_nothing(events):
        return None
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None  # the writer's connection is open
    inputs, params = pg_inputs_insert(records, first=1)
    pending, after = pg_pending_insert([pending_row(e) for e in events], first=len(params) + 1)
    await driver.execute(_alone_sql(inputs, pending), *params, *after)
    # what write_events does after its insert: count, wake the sequencers (on PostgreSQL every
    # append of a process runs on its event loop, so the count needs no lock here)
    sink.APPENDED[0] += len(events)
    for wake in sink.APPEND_WAKES:
        wake()
    return [None] * len(batches)


class DecisionRecorder:
    """Makes decision records durable through the group-commit writer."""

    def __init__(self, writer: GroupCommitWriter) -> None:
        self._writer = writer
        writer.register(KIND, _write_batches, statements_only=True, alone=write_alone)

    async def record(self, records: Sequence[DecisionRecord]) -> None:
        await self._writer.submit(KIND, list(records))
