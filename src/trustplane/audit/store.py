"""SQL for the ledger. Stores never commit: every function runs in the caller's transaction.

The append (:func:`append_pending`) is one driver-level multi-row INSERT of already-canonical rows; it is
the only ledger write on a request path. Everything else runs in the sequencer's transaction or reads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.tables import (
    LEAF_LIMITS,
    audit_checkpoints,
    audit_leaves,
    audit_log_keys,
    audit_log_state,
    audit_payloads,
    audit_purge_marks,
    audit_quarantine,
    audit_tree,
    leaf_value,
    pg_leaf_value,
)
from trustplane.storage.driver_sql import (
    by_column,
    in_transaction,
    insert_rows,
    unnest_insert,
    values_clause,
)

#: pg_try_advisory_xact_lock key of the sequencer: "tp-audit" as a 64-bit integer.
SEQUENCER_LOCK = int.from_bytes(b"tp-audit", "big") & 0x7FFF_FFFF_FFFF_FFFF
_CHUNK = 500

#: The columns of an audit_leaves row, in the order of the tuples the sequencer (and the bulk
#: benchmark) writes.
LEAF_COLUMNS = (
    "idx",
    "entry",
    "event_id",
    "type",
    "time_ms",
    "subject",
    "client_id",
    "partner",
    "transaction_id",
    "integrated_at",
)


def _rows(result: Any) -> Sequence[Any]:
    """Rows of a driver-level statement (untyped: the columns are known from the SQL)."""
    rows: Sequence[Any] = result.all()
    return rows


@functools.lru_cache(maxsize=32)
def _insert_sql(dialect: str, table: str, columns: tuple[str, ...]) -> str:
    values = values_clause(dialect, len(columns), 1)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}"  # noqa: S608 - constants


def _in_list(dialect: str, count: int, first: int = 1) -> str:
    if dialect == "postgresql":
        return ", ".join(f"${first + i}" for i in range(count))
    return ", ".join("?" * count)


#: A pending row as the append writes it: (entry, payload, salt), then on PostgreSQL the leaf's
#: index columns as the sequencer stores them (event_id, type, time_ms, subject, client_id,
#: partner, transaction_id: ``audit.sink.leaf_columns``), which its slice copies instead of
#: parsing the entry (:data:`PG_SLICE_SQL`). A row of three (SQLite, whose sequencer parses every
#: entry in Python) leaves them NULL, as do the rows written before migration 0028.
PendingRow = tuple[Any, ...]
_PENDING = (
    ("entry", "text"),
    ("payload", "text"),
    ("salt", "bytea"),
    ("event_id", "text"),
    ("type", "text"),
    ("time_ms", "bigint"),
    ("subject", "text"),
    ("client_id", "text"),
    ("partner", "text"),
    ("transaction_id", "text"),
)


async def append_pending(conn: AsyncConnection, rows: Sequence[PendingRow]) -> None:
    """Pending rows (:data:`PendingRow`, all of one width) into ``audit_pending``, in order:
    durable once the caller commits. PostgreSQL: one insert, one execution (a multi-row ``VALUES``
    or an ``unnest``: :func:`~trustplane.storage.driver_sql.insert_rows`); SQLite: ``executemany``
    of one prepared statement (in-process, no round trips to save)."""
    columns = _PENDING[: len(rows[0])] if rows else _PENDING
    if conn.dialect.name == "postgresql":
        sql, params = insert_rows("audit_pending", columns, rows, ordered=True)
        await conn.exec_driver_sql(sql, tuple(params))
        return
    sql = _insert_sql(conn.dialect.name, "audit_pending", tuple(name for name, _ in columns))
    await conn.exec_driver_sql(sql, list(rows))


def pg_pending_insert(rows: Sequence[PendingRow], first: int) -> tuple[str, Sequence[Any]]:
    """PostgreSQL: :func:`append_pending`'s insert (rows in order, all ten columns) and its
    parameters, numbered from ``first``, for a caller that runs it inside a statement of its own
    (``grant.outcomes``: as a data-modifying CTE of the ``jti`` claim, a token batch's one
    statement)."""
    return insert_rows("audit_pending", _PENDING, rows, ordered=True, first=first)


async def lock_sequencer(conn: AsyncConnection) -> bool:
    """Become the one sequencer for this transaction. PostgreSQL: a transaction-level advisory lock
    (False if another process holds it). SQLite: the first statement is a write, which takes the
    database write lock for the whole transaction (the caller waits for it: busy_timeout)."""
    if conn.dialect.name == "postgresql":
        got = await conn.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({SEQUENCER_LOCK})")
        return bool(got.scalar())
    await conn.exec_driver_sql("UPDATE audit_log_state SET updated_at = updated_at WHERE id = 1")
    return True


async def read_state(conn: AsyncConnection) -> tuple[int, bytes] | None:
    row = (
        await conn.execute(
            select(audit_log_state.c.tree_size, audit_log_state.c.root).where(
                audit_log_state.c.id == 1
            )
        )
    ).first()
    return (int(row[0]), bytes(row[1])) if row else None


async def write_state(
    conn: AsyncConnection, size: int, root: bytes, now: int, *, new: bool
) -> None:
    if new:
        await conn.execute(
            audit_log_state.insert().values(id=1, tree_size=size, root=root, updated_at=now)
        )
    else:
        await conn.execute(
            audit_log_state.update()
            .where(audit_log_state.c.id == 1)
            .values(tree_size=size, root=root, updated_at=now)
        )


async def advance_state(
    conn: AsyncConnection, old_size: int, new_size: int, root: bytes, now: int
) -> bool:
    """Move the tree from ``old_size`` to ``new_size`` (False, nothing written, if it is not at
    ``old_size``: another sequencer moved it). On SQLite this first write takes the database write
    lock, so the check and everything after it in the transaction see no other writer."""
    result = await conn.execute(
        audit_log_state.update()
        .where(audit_log_state.c.id == 1, audit_log_state.c.tree_size == old_size)
        .values(tree_size=new_size, root=root, updated_at=now)
    )
    return bool(result.rowcount == 1)


async def take_pending(conn: AsyncConnection, limit: int) -> Sequence[Any]:
    """The oldest pending rows (id, entry, payload, salt) as the driver gives them (the caller
    converts each as it goes: 1 us a row, which for a whole batch at once would hold the event
    loop 2 ms); they are deleted by :func:`drop_pending`."""
    sql = f"SELECT id, entry, payload, salt FROM audit_pending ORDER BY id LIMIT {int(limit)}"  # noqa: S608
    driver = await in_transaction(conn)
    if driver is not None:  # PostgreSQL: the records as asyncpg decodes them, no result layers
        records: Sequence[Any] = await driver.fetch(sql)
        return records
    return _rows(await conn.exec_driver_sql(sql))


async def drop_pending(conn: AsyncConnection, ids: Sequence[int]) -> int:
    dropped = 0
    for i in range(0, len(ids), _CHUNK):
        chunk = list(ids[i : i + _CHUNK])
        sql = f"DELETE FROM audit_pending WHERE id IN ({_in_list(conn.dialect.name, len(chunk))})"  # noqa: S608
        result = await conn.exec_driver_sql(sql, tuple(chunk))
        dropped += int(result.rowcount or 0)
    return dropped


async def oldest_pending(conn: AsyncConnection) -> Any:
    """The oldest pending row (id, entry, payload, salt), or None."""
    sql = "SELECT id, entry, payload, salt FROM audit_pending ORDER BY id LIMIT 1"
    return (await conn.exec_driver_sql(sql)).first()


async def quarantine_pending(
    conn: AsyncConnection,
    raw: tuple[int, str, str, bytes, str, str],
    event_id: str,
    placeholder: PendingRow,
    now_ms: int,
) -> None:
    """The pending row ``raw`` (id, entry, payload, salt, error, detail) into ``audit_quarantine``
    and, under the same id (its place in the log), ``placeholder`` (a :data:`PendingRow`) into
    ``audit_pending``: in the sequencer's transaction. The raw row's leaf columns, if it had
    any, are not kept: they are what its entry gives (``audit.sink.leaf_columns``)."""
    pending_id, entry, payload, salt, error, detail = raw
    await conn.execute(
        audit_quarantine.insert().values(
            pending_id=pending_id,
            entry=entry,
            payload=payload,
            salt=salt,
            error=error,
            detail=detail,
            event_id=event_id,
            quarantined_at=now_ms,
        )
    )
    names = tuple(name for name, _ in _PENDING[: len(placeholder)])
    sql = _insert_sql(conn.dialect.name, "audit_pending", ("id", *names))
    drop = f"DELETE FROM audit_pending WHERE id = {_in_list(conn.dialect.name, 1)}"  # noqa: S608
    dropped = await conn.exec_driver_sql(drop, (pending_id,))
    if dropped.rowcount != 1:
        raise RuntimeError("pending entries changed under the sequencer lock")
    await conn.exec_driver_sql(sql, (pending_id, *placeholder))


async def count_quarantined(conn: AsyncConnection) -> int:
    return int(
        (await conn.execute(select(func.count()).select_from(audit_quarantine))).scalar() or 0
    )


async def has_pending(conn: AsyncConnection) -> bool:
    """Whether any entry waits for the sequencer (a read: takes no lock, on SQLite either)."""
    result = await conn.exec_driver_sql("SELECT 1 FROM audit_pending LIMIT 1")
    return result.first() is not None


async def pg_has_pending(conn: AsyncConnection) -> bool:
    """PostgreSQL: :func:`has_pending` on the connection's asyncpg connection (no SQLAlchemy
    execution context and result: of the idle sequencer's poll, about a third of its CPU),
    through the primary key (:data:`PG_HAS_PENDING_SQL`)."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    return await driver.fetchval(PG_HAS_PENDING_SQL) is not None


#: Whether anything is pending, read through the primary key: the table is a queue (every row
#: inserted is deleted when integrated), so until a vacuum its heap starts with the dead rows of
#: everything integrated since, which a sequential scan (what ``LIMIT 1`` alone gets) reads
#: through before it finds a live row: 45 ms after 230,000 entries, growing with the load.
PG_HAS_PENDING_SQL = "SELECT 1 FROM audit_pending ORDER BY id LIMIT 1"


async def pg_vacuum_pending(conn: AsyncConnection) -> None:
    """PostgreSQL, on an autocommit connection: ``VACUUM audit_pending`` (:meth:`Ledger.integrate
    <trustplane.audit.ledger.Ledger.integrate>` after every :data:`~trustplane.audit.ledger.VACUUM_EVERY`
    entries it moved). Takes no lock that blocks the appends or the sequencer's deletes.

    ``TRUNCATE false`` (and the table's ``vacuum_truncate = false``, migration ``0024``, for any
    other VACUUM): a vacuum that truncated the emptied queue to 0 pages left statistics saying
    "empty", the reads of the queue prepared on the long-lived connections (this poll, the
    sequencer's batch read) were planned again on them as sequential scans and kept those
    generic plans (no ANALYZE with autovacuum off) while the next 20,000 entries' dead rows piled
    up: every poll and batch read went through all of them (``tests/audit/test_pending_plans.py``).
    Kept at its size, the heap is reused by the next appends and the plans stay on the key."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    await driver.execute(PG_VACUUM_PENDING_SQL)


#: See :func:`pg_vacuum_pending`.
PG_VACUUM_PENDING_SQL = "VACUUM (TRUNCATE false) audit_pending"


async def count_pending(conn: AsyncConnection) -> int:
    return int((await conn.exec_driver_sql("SELECT count(*) FROM audit_pending")).scalar() or 0)


#: PostgreSQL types of the integrated tables' columns, for :func:`unnest_insert`.
_TYPED: dict[str, tuple[tuple[str, str], ...]] = {
    "audit_leaves": tuple(
        (c, "bigint" if c in ("idx", "time_ms", "integrated_at") else "text") for c in LEAF_COLUMNS
    ),
    "audit_tree": (("id", "bigint"), ("hash", "bytea")),
    "audit_payloads": (("idx", "bigint"), ("payload", "text"), ("salt", "bytea")),
}


#: PostgreSQL: leaves per insert of an integration (their nodes, about two per leaf, go twice as many
#: at a time). asyncpg encodes a statement's parameters on the event loop in one go: about 2 us
#: per leaf with its node and payload rows, so a slice holds the loop about 0.25 ms (the
#: 2,048-leaf batch inserted at once held it 4-8 ms; docs/ledger.md, "Proofs during an
#: integration").
INSERT_SLICE = 128


async def insert_integrated(
    conn: AsyncConnection,
    leaves: Sequence[tuple[Any, ...]],
    nodes: Sequence[tuple[int, bytes]],
    payloads: Sequence[tuple[int, str, bytes]],
) -> None:
    """The rows of an integration. PostgreSQL: one ``unnest`` insert per table for every
    :data:`INSERT_SLICE` leaves, the loop free between them; SQLite: one ``executemany`` per
    table, in the driver's thread (the write lock is held meanwhile: no more statements than
    that)."""
    pg = conn.dialect.name == "postgresql"
    for table, rows, per_leaf in (
        ("audit_leaves", leaves, 1),
        ("audit_tree", nodes, 2),
        ("audit_payloads", payloads, 1),
    ):
        step = INSERT_SLICE * per_leaf if pg else max(1, len(rows))
        for first in range(0, len(rows), step):
            await _insert_rows(conn, table, rows[first : first + step])


async def _insert_rows(conn: AsyncConnection, table: str, rows: Sequence[Sequence[Any]]) -> None:
    """PostgreSQL: one ``unnest`` insert (one execution instead of one per row); SQLite:
    ``executemany``."""
    columns = _TYPED[table]
    if conn.dialect.name == "postgresql":
        await conn.exec_driver_sql(unnest_insert(table, columns), by_column(rows, len(columns)))
        return
    sql = _insert_sql(conn.dialect.name, table, tuple(name for name, _ in columns))
    await conn.exec_driver_sql(sql, list(rows))


#: PostgreSQL: one statement per slice of an integration. The leaves' entries, payloads and salts
#: are already on the server, in the pending rows: the statement deletes the slice's pending rows
#: (by id) and inserts them as leaves ``first, first + 1, ...`` in the order of the ids given, the
#: leaf columns copied from the pending row (written by the append, already mapped by
#: ``tables.leaf_value``: migration 0028) or, for a row without them (``time_ms`` NULL: written
#: before that migration or past the append path), taken from the entry's JSON, their payloads, and the slice's tree nodes. What the client sends is the ids as text and the
#: node hashes as one ``bytea``: no per-row parameter encoding (asyncpg's array encoder checks
#: every element against ``collections.abc``: a third of the integration's CPU). It answers how
#: many pending rows it moved (the caller checks it is all of them).
#: An entry holding a NUL character (a request's field, ``\u0000`` in the canonical JSON: no text
#: column can hold it and PostgreSQL's JSON types refuse the escape) has its leaf columns taken
#: with U+FFFD in the NUL's place (only an escape, not a backslash's ``\\u0000``); the entry
#: itself is stored, hashed and proved as it is.
_PG_SLICE_SQL = (
    "WITH r AS (SELECT * FROM unnest($1::text::bigint[]) WITH ORDINALITY AS r(pid, o)), "
    "d AS (DELETE FROM audit_pending p USING r WHERE p.id = r.pid "
    "RETURNING r.o, p.entry, p.payload, p.salt, p.event_id AS c_event_id, p.type AS c_type, "
    "p.time_ms AS c_time_ms, p.subject AS c_subject, p.client_id AS c_client_id, "
    "p.partner AS c_partner, p.transaction_id AS c_transaction_id), "
    "j AS (SELECT $2::bigint + d.o - 1 AS idx, d.*, "
    "CASE WHEN d.c_time_ms IS NULL THEN {jsonb} END AS e FROM d), "
    "l AS (INSERT INTO audit_leaves (idx, entry, event_id, type, time_ms, subject, client_id, "
    "partner, transaction_id, integrated_at) "
    "SELECT idx, entry, {event_id}, {type}, COALESCE(c_time_ms, (e->>'time')::bigint), "
    "{subject}, {client_id}, {partner}, {transaction_id}, $3::bigint FROM j RETURNING 1), "
    "p AS (INSERT INTO audit_payloads (idx, payload, salt) SELECT idx, payload, salt FROM j), "
    "t AS (INSERT INTO audit_tree (id, hash) "
    "SELECT n.i, substring($5::bytea FROM (n.o::int - 1) * 32 + 1 FOR 32) "
    "FROM unnest($4::text::bigint[]) WITH ORDINALITY AS n(i, o)) "
    "SELECT count(*) FROM l"
)


def _leaf_column_sql(column: str) -> str:
    """The leaf's ``column``: the pending row's, copied, if it has its leaf columns (``c_time_ms``
    not NULL), else the entry's value as :func:`pg_leaf_value` maps it. Each bounded leaf column
    gets the entry's value only if it fits (``tables.leaf_value``): an over-long subject, client
    id or transaction id stopped every integration after it with "value too long" (the entry
    keeps the whole value; it is what is hashed and proved)."""
    parsed = pg_leaf_value(f"(e->>'{column}')", column)
    return f"CASE WHEN c_time_ms IS NULL THEN {parsed} ELSE c_{column} END"


_LEAF_COLUMNS_SQL = {c: _leaf_column_sql(c) for c in LEAF_LIMITS}
#: The common slice: no entry without leaf columns holds the text ``\u0000``, so each is parsed
#: as it is (an entry that has its columns is not parsed: the append mapped a NUL to U+FFFD).
PG_SLICE_SQL = _PG_SLICE_SQL.format(jsonb="d.entry::jsonb", **_LEAF_COLUMNS_SQL)
#: A slice with an entry that holds ``\u0000`` (the sequencer looks for it while it hashes the
#: entries): such entries are parsed with U+FFFD in each NUL escape's place. Searching every entry
#: on the server for it (``strpos``) cost ~2.8 us of PostgreSQL's CPU per ~700-byte entry, about a
#: third of its parse.
PG_SLICE_NUL_SQL = _PG_SLICE_SQL.format(
    jsonb="(CASE WHEN strpos(d.entry, '\\u0000') = 0 "
    "THEN d.entry ELSE regexp_replace(d.entry, '(?<!\\\\)((?:\\\\\\\\)*)\\\\u0000', "
    "'\\1\\\\ufffd', 'g') END)::jsonb",
    **_LEAF_COLUMNS_SQL,
)
#: The text a NUL escape has in a canonical entry.
NUL_ESCAPE = "\\u0000"

#: PostgreSQL: the end of an integration in one statement: the state moves to the new size and
#: root, and the checkpoint signed for it is stored.
PG_ADVANCE_SQL = (
    "WITH s AS (UPDATE audit_log_state SET tree_size = $1, root = $2, updated_at = $3 "
    "WHERE id = 1 RETURNING 1) "
    "INSERT INTO audit_checkpoints (tree_size, root, note, created_at) "
    "SELECT $1, $2, $4, $3 FROM s"
)


def int_array(values: Sequence[int]) -> str:
    """A PostgreSQL array literal of integers (``{1,2,3}``): one text parameter, which asyncpg
    encodes in one step (a ``bigint[]`` parameter is encoded element by element)."""
    return "{" + ",".join(map(str, values)) + "}"


async def pg_move_slice(
    driver: Any,
    pending_ids: Sequence[int],
    first: int,
    now: int,
    nodes: Sequence[tuple[int, bytes]],
    *,
    nul: bool = False,
) -> int:
    """PostgreSQL, in the sequencer's transaction (``driver``: its asyncpg connection): the pending
    rows ``pending_ids`` become the leaves ``first, first + 1, ...`` (in that order), with their
    payloads, and ``nodes`` (32-byte hashes) are inserted; one statement (:data:`PG_SLICE_SQL`, or
    :data:`PG_SLICE_NUL_SQL` when ``nul``: an entry of the slice holds :data:`NUL_ESCAPE`).
    Returns how many pending rows were moved."""
    hashes = b"".join(h for _, h in nodes)
    if len(hashes) != 32 * len(nodes):
        raise ValueError("tree node hashes are 32 bytes")
    moved = await driver.fetchval(
        PG_SLICE_NUL_SQL if nul else PG_SLICE_SQL,
        int_array(pending_ids),
        first,
        now,
        int_array([i for i, _ in nodes]),
        hashes,
    )
    return int(moved)


async def pg_advance(driver: Any, size: int, root: bytes, note: str, now: int) -> None:
    """PostgreSQL, in the sequencer's transaction: the state and the new checkpoint, one statement."""
    await driver.execute(PG_ADVANCE_SQL, size, root, now, note)


async def pg_read_state(driver: Any) -> tuple[int, bytes] | None:
    row = await driver.fetchrow("SELECT tree_size, root FROM audit_log_state WHERE id = 1")
    return (int(row[0]), bytes(row[1])) if row else None


async def pg_state_and_pending(
    driver: Any, limit: int
) -> tuple[tuple[int, bytes] | None, list[tuple[int, str]]]:
    """PostgreSQL, in one statement: the state (None: a new log) and the oldest ``limit`` pending
    (id, entry) rows (the payloads stay on the server: :func:`pg_move_slice` copies them)."""
    rows = await driver.fetch(
        "SELECT s.tree_size, s.root, p.id, p.entry FROM audit_log_state s "
        "LEFT JOIN LATERAL (SELECT id, entry FROM audit_pending ORDER BY id LIMIT $1) p ON true "
        "WHERE s.id = 1 ORDER BY p.id",
        limit,
    )
    if not rows:
        return None, []
    state = (int(rows[0][0]), bytes(rows[0][1]))
    return state, [(r[2], r[3]) for r in rows if r[2] is not None]


async def pg_take_pending(driver: Any, limit: int) -> Sequence[Any]:
    """PostgreSQL: the oldest pending (id, entry) rows; the payloads stay on the server
    (:func:`pg_move_slice` copies them)."""
    rows: Sequence[Any] = await driver.fetch(
        "SELECT id, entry FROM audit_pending ORDER BY id LIMIT $1", limit
    )
    return rows


async def pg_read_nodes(driver: Any, ids: Sequence[int]) -> dict[int, bytes]:
    if not ids:
        return {}
    rows = await driver.fetch(
        "SELECT id, hash FROM audit_tree WHERE id = ANY($1::text::bigint[])",
        int_array(sorted(set(ids))),
    )
    return {int(r[0]): bytes(r[1]) for r in rows}


async def read_nodes(conn: AsyncConnection, ids: Sequence[int]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    ids = sorted(set(ids))
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        sql = f"SELECT id, hash FROM audit_tree WHERE id IN ({_in_list(conn.dialect.name, len(chunk))})"  # noqa: S608
        for row in _rows(await conn.exec_driver_sql(sql, tuple(chunk))):
            out[int(row[0])] = bytes(row[1])
    return out


#: The tree size, in one statement (no row before the first integration).
TREE_SIZE_SQL = "SELECT tree_size FROM audit_log_state WHERE id = 1"


def nodes_sql(dialect: str, count: int) -> str:
    """One statement reading ``count`` tree nodes by id. PostgreSQL: the ids as one array
    parameter, so the text (and the prepared statement) is the same for any count; SQLite: an
    ``IN`` list of ``count`` parameters (SQLite allows 32,766)."""
    if dialect == "postgresql":
        return "SELECT id, hash FROM audit_tree WHERE id = ANY($1::bigint[])"
    return f"SELECT id, hash FROM audit_tree WHERE id IN ({_in_list(dialect, count)})"  # noqa: S608


#: PostgreSQL: how many nodes have an id from ``$1`` to ``$2`` - 1, and their hashes concatenated
#: in id order (one ``bytea``: nothing decoded per node).
PG_NODE_RUN_SQL = (
    "SELECT count(*), string_agg(hash, ''::bytea ORDER BY id) FROM audit_tree "
    "WHERE id >= $1 AND id < $2"
)


def nodes_run_sql(dialect: str) -> str:
    """The hashes of the nodes with an id from the first parameter to the second (excluded), in
    id order."""
    p = _in_list(dialect, 2).split(", ")
    return f"SELECT hash FROM audit_tree WHERE id >= {p[0]} AND id < {p[1]} ORDER BY id"  # noqa: S608 - constants


def upper_nodes_sql(dialect: str) -> str:
    """The nodes with an id of at least the first parameter, the highest first, at most the second
    parameter of them: with ``id = level << 48 | index``, every node of a level and above."""
    p = _in_list(dialect, 2).split(", ")
    return f"SELECT id, hash FROM audit_tree WHERE id >= {p[0]} ORDER BY id DESC LIMIT {p[1]}"  # noqa: S608 - constants


async def add_checkpoint(
    conn: AsyncConnection, size: int, root: bytes, note: str, now: int
) -> None:
    await conn.execute(
        audit_checkpoints.insert().values(tree_size=size, root=root, note=note, created_at=now)
    )


async def latest_checkpoint(conn: AsyncConnection) -> tuple[int, bytes, str] | None:
    row = (
        await conn.execute(
            select(
                audit_checkpoints.c.tree_size, audit_checkpoints.c.root, audit_checkpoints.c.note
            )
            .order_by(audit_checkpoints.c.tree_size.desc())
            .limit(1)
        )
    ).first()
    return (int(row[0]), bytes(row[1]), str(row[2])) if row else None


async def checkpoint_at(conn: AsyncConnection, size: int) -> tuple[int, bytes, str] | None:
    row = (
        await conn.execute(
            select(
                audit_checkpoints.c.tree_size, audit_checkpoints.c.root, audit_checkpoints.c.note
            ).where(audit_checkpoints.c.tree_size == size)
        )
    ).first()
    return (int(row[0]), bytes(row[1]), str(row[2])) if row else None


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One integrated entry: canonical ``entry`` text, its leaf hash, and the payload (None: purged)."""

    index: int
    entry: str
    leaf_hash: bytes
    payload: str | None
    salt: bytes | None


_ENTRY_SELECT = (
    "SELECT l.idx, l.entry, t.hash, p.payload, p.salt FROM audit_leaves l "
    "JOIN audit_tree t ON t.id = l.idx LEFT JOIN audit_payloads p ON p.idx = l.idx "
)


def _entries(rows: Sequence[Any]) -> list[StoredEntry]:
    return [
        StoredEntry(int(r[0]), r[1], bytes(r[2]), r[3], bytes(r[4]) if r[4] is not None else None)
        for r in rows
    ]


async def entries_range(conn: AsyncConnection, start: int, end: int) -> list[StoredEntry]:
    """Leaves ``[start, end)`` in index order (level-0 tree nodes have id = index)."""
    p = _in_list(conn.dialect.name, 2).split(", ")
    sql = f"{_ENTRY_SELECT}WHERE l.idx >= {p[0]} AND l.idx < {p[1]} ORDER BY l.idx"
    return _entries((await conn.exec_driver_sql(sql, (start, end))).all())


async def entries_where(
    conn: AsyncConnection, filters: dict[str, Any], after: int, below: int, limit: int
) -> list[StoredEntry]:
    """Leaves matching equality ``filters`` (column -> value) and ``since``/``until`` time bounds,
    with ``after <= index < below``, in index order, at most ``limit``: one query."""
    leaves = audit_leaves
    query = (
        select(
            leaves.c.idx,
            leaves.c.entry,
            audit_tree.c.hash,
            audit_payloads.c.payload,
            audit_payloads.c.salt,
        )
        .select_from(
            leaves.join(audit_tree, audit_tree.c.id == leaves.c.idx).outerjoin(
                audit_payloads, audit_payloads.c.idx == leaves.c.idx
            )
        )
        .where(leaves.c.idx >= after, leaves.c.idx < below)
    )
    for name, value in filters.items():
        if name == "since":
            query = query.where(leaves.c.time_ms >= value)
        elif name == "until":
            query = query.where(leaves.c.time_ms < value)
        else:
            query = query.where(leaves.c[name] == _filter_value(name, value))
    return _entries((await conn.execute(query.order_by(leaves.c.idx).limit(limit))).all())


def _filter_value(column: str, value: Any) -> Any:
    """What a leaf column holds for an entry whose field is ``value`` (``tables.leaf_value``)."""
    limit = LEAF_LIMITS.get(column)
    return value if limit is None else leaf_value(value, limit)


async def latest_where(
    conn: AsyncConnection, filters: dict[str, Any], limit: int
) -> list[StoredEntry]:
    """The newest leaves matching equality ``filters``, newest first."""
    query = select(audit_leaves.c.idx)
    for name, value in filters.items():
        query = query.where(audit_leaves.c[name] == _filter_value(name, value))
    ids = [
        int(r[0])
        for r in (await conn.execute(query.order_by(audit_leaves.c.idx.desc()).limit(limit))).all()
    ]
    if not ids:
        return []
    sql = f"{_ENTRY_SELECT}WHERE l.idx IN ({_in_list(conn.dialect.name, len(ids))}) ORDER BY l.idx DESC"
    return _entries((await conn.exec_driver_sql(sql, tuple(ids))).all())


async def pending_bodies(conn: AsyncConnection, limit: int) -> list[tuple[str, str]]:
    """(entry, payload) of pending entries, newest first."""
    result = await conn.exec_driver_sql(
        f"SELECT entry, payload FROM audit_pending ORDER BY id DESC LIMIT {int(limit)}"  # noqa: S608
    )
    return [(r[0], r[1]) for r in _rows(result)]


#: Leaves read per statement when looking for late leaves among those integrated since a mark.
_LATE_PAGE = 5000

_MARK_SQL = text(
    "INSERT INTO audit_purge_marks (type, cutoff_ms, idx) VALUES (:type, :cutoff_ms, :idx) "
    "ON CONFLICT (type) DO UPDATE SET cutoff_ms = excluded.cutoff_ms, idx = excluded.idx"
)


async def _purge_marks(conn: AsyncConnection) -> dict[str, tuple[int, int]]:
    """type -> (cutoff_ms, idx) of :data:`~trustplane.audit.tables.audit_purge_marks` (one row a type)."""
    rows = (await conn.execute(select(audit_purge_marks))).all()
    return {str(r.type): (int(r.cutoff_ms), int(r.idx)) for r in rows}


def _aged(type_: str, mark: tuple[int, int] | None, cutoff_ms: int) -> Any:
    """The leaves of ``type_`` with a time in [the mark's cutoff, ``cutoff_ms``): a range of
    ``ix_audit_leaves_type_time`` (no mark: every leaf of the type older than ``cutoff_ms``)."""
    c = audit_leaves.c
    query = select(c.idx).where(c.type == type_, c.time_ms < cutoff_ms)
    return query if mark is None else query.where(c.time_ms >= mark[0])


async def _late(
    conn: AsyncConnection,
    cutoffs: dict[str, int],
    marks: dict[str, tuple[int, int]],
    top: int,
) -> dict[str, list[int]]:
    """By type, the leaves integrated since their type's mark (index in (mark idx, ``top``]) whose
    time is before both the mark's cutoff and the type's (the leaves the aged range misses: a late
    leaf with an old time). One primary-key range for every type, a page at a time, which returns
    only the leaves old enough for some type (late ones: rare); a type without a mark needs none
    (its aged range has no lower bound)."""
    marked = {t: marks[t] for t in cutoffs if t in marks}
    if not marked:
        return {}
    after = min(idx for _cutoff, idx in marked.values())
    bound = max(min(cutoffs[t], cutoff) for t, (cutoff, _idx) in marked.items())
    found: dict[str, list[int]] = {}
    c = audit_leaves.c
    while after < top:
        query = (
            select(c.idx, c.type, c.time_ms)
            .where(c.idx > after, c.idx <= top, c.time_ms < bound)
            .order_by(c.idx)
            .limit(_LATE_PAGE)
        )
        rows = (await conn.execute(query)).all()
        for idx, type_, time_ms in rows:
            mark = marked.get(type_)
            if mark and idx > mark[1] and time_ms < min(cutoffs[type_], mark[0]):
                found.setdefault(str(type_), []).append(int(idx))
        if len(rows) < _LATE_PAGE:
            break
        after = int(rows[-1][0])
    return found


async def _top(conn: AsyncConnection) -> int:
    """The largest leaf index (-1: none). The sequencer commits leaves in index order (one at a
    time, under its lock), so every leaf up to it is visible to this and every later statement."""
    result = await conn.execute(select(func.max(audit_leaves.c.idx)))
    value = result.scalar()
    return -1 if value is None else int(value)


async def purge_payloads(conn: AsyncConnection, cutoffs: dict[str, int]) -> dict[str, int]:
    """Delete the payloads of the leaves of each type older than its cutoff (``cutoffs``: type ->
    ms); the count deleted by type.

    Its cost follows what is newly due, not the ledger's history. It read every leaf of the type
    older than the cutoff, those purged years ago included (the leaves stay). A mark per type
    (``audit_purge_marks``: every leaf of the type up to ``idx`` older than ``cutoff_ms`` has no
    payload) bounds each round to two ranges: the leaves of the type between the mark's cutoff and
    the new one (``ix_audit_leaves_type_time``), and the leaves integrated since the mark's index
    (the primary key, read once for every type) whose time is before the mark's cutoff: a leaf
    integrated late with an old time is purged at the next round like any other. The round then
    marks (cutoff, largest index read before it): true of the rows whatever happens next, since a
    payload is only written with its leaf (at a larger index) and never restored, and whatever the
    settings (a longer period moves a cutoff back: the round marks the smaller cutoff). Why not the
    alternatives: a DELETE driven from ``audit_payloads`` reads every payload still kept (the whole
    table with a ten-year ``"*"``); an index making the due rows a range would need the leaf's type
    and time copied into ``audit_payloads`` (every row rewritten by the migration). Concurrent
    purgers each delete their ranges (PostgreSQL: one waits on the other's row locks, then skips the
    rows gone) and each writes a mark true of what it saw; the last one wins, either is correct."""
    top = await _top(conn)
    marks = await _purge_marks(conn)
    counts: dict[str, int] = {}
    for type_, cutoff in cutoffs.items():
        aged = _aged(type_, marks.get(type_), cutoff)
        result = await conn.execute(audit_payloads.delete().where(audit_payloads.c.idx.in_(aged)))
        counts[type_] = int(result.rowcount or 0)
    for type_, ids in (await _late(conn, cutoffs, marks, top)).items():
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            result = await conn.execute(
                audit_payloads.delete().where(audit_payloads.c.idx.in_(chunk))
            )
            counts[type_] += int(result.rowcount or 0)
    if cutoffs:
        await conn.execute(
            _MARK_SQL,
            [{"type": t, "cutoff_ms": c, "idx": top} for t, c in cutoffs.items()],
        )
    return {t: n for t, n in counts.items() if n}


async def due_payloads(conn: AsyncConnection, cutoffs: dict[str, int]) -> dict[str, int]:
    """The payloads :func:`purge_payloads` would delete now, by type (the same ranges; read only)."""
    top = await _top(conn)
    marks = await _purge_marks(conn)
    late = await _late(conn, cutoffs, marks, top)
    due: dict[str, int] = {}
    for type_, cutoff in cutoffs.items():
        aged = _aged(type_, marks.get(type_), cutoff).subquery()
        query = select(func.count()).select_from(
            aged.join(audit_payloads, audit_payloads.c.idx == aged.c.idx)
        )
        count = int((await conn.execute(query)).scalar() or 0)
        ids = late.get(type_, [])
        for i in range(0, len(ids), _CHUNK):
            query = select(func.count()).where(audit_payloads.c.idx.in_(ids[i : i + _CHUNK]))
            count += int((await conn.execute(query)).scalar() or 0)
        due[type_] = count
    return due


#: The leaf types in order, one index probe each through ``ix_audit_leaves_type_time`` (the next
#: type after the last one found: a loose index scan, written out as a recursive query). ``SELECT
#: DISTINCT type`` read every leaf (PostgreSQL: a sequential scan and a hash aggregate, 117 ms at
#: 300,000 leaves), once a minute in every process when a ``"*"`` retention period is set.
LEAF_TYPES_SQL = (
    "WITH RECURSIVE t(type) AS (SELECT min(type) FROM audit_leaves UNION ALL "
    "SELECT (SELECT min(l.type) FROM audit_leaves l WHERE l.type > t.type) "
    "FROM t WHERE t.type IS NOT NULL) "
    "SELECT type FROM t WHERE type IS NOT NULL"
)


async def leaf_types(conn: AsyncConnection) -> list[str]:
    """Every type a leaf has, in order (:data:`LEAF_TYPES_SQL`)."""
    return [str(r[0]) for r in (await conn.exec_driver_sql(LEAF_TYPES_SQL)).all()]


async def read_log_key(conn: AsyncConnection, name: str) -> tuple[bytes, bytes] | None:
    row = (
        await conn.execute(
            select(audit_log_keys.c.public_key, audit_log_keys.c.private_key).where(
                audit_log_keys.c.name == name
            )
        )
    ).first()
    return (bytes(row[0]), bytes(row[1])) if row else None


async def add_log_key(
    conn: AsyncConnection, name: str, public: bytes, private: bytes, now: int
) -> None:
    await conn.execute(
        audit_log_keys.insert().values(
            name=name, public_key=public, private_key=private, created_at=now
        )
    )
