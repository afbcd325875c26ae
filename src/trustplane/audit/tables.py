"""The ledger's tables.

- ``audit_pending``: appended entries, durable, not yet in the tree (the append path's only write).
- ``audit_leaves``: the integrated entries, by leaf index, with the envelope columns queries filter on.
- ``audit_tree``: the hash of every perfect subtree, keyed by ``merkle.node_id(level, index)``.
- ``audit_payloads``: the personal payload and its salt, beside the leaf; purged by retention.
- ``audit_checkpoints``: every signed checkpoint; ``audit_log_state`` the current size and root.
- ``audit_log_keys``: the log's Ed25519 key (private part encrypted under the KEK).
- ``audit_ingested``: the services' events already recorded, by (issuer, ``jti``) (idempotency).
- ``audit_purge_marks``: how far retention's purge has gone, per type (migration ``0014``).
- ``audit_quarantine``: pending rows the sequencer could not integrate, raw, each replaced in the log
  by a placeholder leaf that commits to its digests (migration ``0024``; docs/ledger.md, "Quarantine").

Leaves, tree nodes and checkpoints are append-only: database triggers (migration ``0002_ledger``) refuse
UPDATE and DELETE; payload rows may only be deleted (the purge), never updated.
"""

import hashlib

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, String, Table, Text, text

from trustplane.storage.metadata import metadata

_ID = Integer().with_variant(BigInteger(), "postgresql")


def partial_index(name: str, column: str, *more: str) -> Index:
    """An index of the rows where ``column`` is not NULL: every query on it asks ``column = value``
    (which implies NOT NULL, so both planners still use it), and a row where it is NULL (most of a
    token workload's, for some columns) costs no index entry. Migration ``0011_partial_indexes``."""
    where = text(f"{column} IS NOT NULL")
    return Index(name, column, *more, postgresql_where=where, sqlite_where=where)


#: The leaf filters by equality (``Ledger.search``, the audit API's and console's filters, the
#: CLI export): (index name suffix, column). Each index ends with ``idx``, the order results come in.
_BY_COLUMN = (
    ("transaction", "transaction_id"),
    ("subject", "subject"),
    ("client", "client_id"),
    ("partner", "partner"),
)

audit_pending = Table(
    "audit_pending",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("entry", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("salt", LargeBinary, nullable=False),
    # The leaf's index columns, as the sequencer stores them (``leaf_value``), written by the
    # append on PostgreSQL so that the sequencer's slice copies them instead of parsing the entry;
    # NULL in a row written before migration 0028 or past the append path (``time_ms`` NULL: the
    # entry is parsed) and on SQLite, whose sequencer parses every entry in Python.
    Column("event_id", Text),
    Column("type", Text),
    Column("time_ms", BigInteger),
    Column("subject", Text),
    Column("client_id", Text),
    Column("partner", Text),
    Column("transaction_id", Text),
)

audit_leaves = Table(
    "audit_leaves",
    metadata,
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("entry", Text, nullable=False),
    Column("event_id", String(32), nullable=False),
    Column("type", String(64), nullable=False),
    Column("time_ms", BigInteger, nullable=False),
    Column("subject", String(256)),
    Column("client_id", String(128)),
    Column("partner", String(256)),
    Column("transaction_id", String(128)),
    Column("integrated_at", BigInteger, nullable=False),
    *(partial_index(f"ix_audit_leaves_{name}", column, "idx") for name, column in _BY_COLUMN),
    Index("ix_audit_leaves_type_time", "type", "time_ms"),
    # PostgreSQL: a block-range index (time follows the insertion order): migration 0012
    Index(
        "ix_audit_leaves_time",
        "time_ms",
        postgresql_using="brin",
        postgresql_with={"autosummarize": "on"},
    ),
)

audit_tree = Table(
    "audit_tree",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary, nullable=False),
)

audit_payloads = Table(
    "audit_payloads",
    metadata,
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("payload", Text, nullable=False),
    Column("salt", LargeBinary, nullable=False),
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("root", LargeBinary, nullable=False),
    Column("note", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

audit_log_state = Table(
    "audit_log_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("tree_size", BigInteger, nullable=False),
    Column("root", LargeBinary, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

audit_log_keys = Table(
    "audit_log_keys",
    metadata,
    Column("name", String(256), primary_key=True),
    Column("public_key", LargeBinary, nullable=False),
    Column("private_key", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

#: Events ingested from a service (``POST /audit/events``), one row per (event issuer, ``jti``): the
#: INSERT ... ON CONFLICT DO NOTHING in the appending transaction makes a re-sent event a duplicate,
#: never a second entry. ``event_id`` is the ledger entry's.
audit_ingested = Table(
    "audit_ingested",
    metadata,
    Column("issuer", String(256), primary_key=True),
    Column("jti", String(128), primary_key=True),
    Column("event_id", String(32), nullable=False),
    Column("digest", String(64), nullable=False),  # SHA-256 of the JWS, hex: same jti, same event
    Column("client_id", String(128), nullable=False),
    Column("type", String(64), nullable=False),
    Column("transaction_id", String(128)),
    Column("ingested_at", BigInteger, nullable=False),
)

#: How far the retention purge has gone, one row per event type: every leaf of ``type`` with an index
#: up to ``idx`` and a time before ``cutoff_ms`` has no payload left (``store.purge_payloads``). A
#: fact about the rows, whatever the retention settings: payloads are only ever written with their
#: leaf and only ever deleted. Migration ``0014_audit_purge_marks``.
audit_purge_marks = Table(
    "audit_purge_marks",
    metadata,
    Column("type", String(64), primary_key=True),
    Column("cutoff_ms", BigInteger, nullable=False),
    Column("idx", BigInteger, nullable=False),
)

#: A pending row the sequencer could not integrate (:meth:`trustplane.audit.ledger.Ledger.quarantine`),
#: as it was, with why: in the log its place is taken by a placeholder leaf (``event_id``, of type
#: ``audit:entry:quarantined``) whose entry holds this row's ``entry_sha256`` and ``payload_sha256``.
#: Never deleted by the ledger: an operator's evidence (docs/ledger.md, "Quarantine").
audit_quarantine = Table(
    "audit_quarantine",
    metadata,
    Column("pending_id", BigInteger, primary_key=True, autoincrement=False),
    Column("entry", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("salt", LargeBinary, nullable=False),
    Column("error", String(128), nullable=False),  # the exception's class, and SQLSTATE if any
    Column("detail", Text, nullable=False),
    Column("event_id", String(32), nullable=False),  # the placeholder's
    Column("quarantined_at", BigInteger, nullable=False),
)

#: Every bounded leaf column and its length: the sequencer stores the entry's value in it only if
#: it fits (:func:`leaf_value`).
LEAF_LIMITS: dict[str, int] = {
    c.name: int(c.type.length)
    for c in audit_leaves.columns
    if isinstance(c.type, String) and c.type.length is not None
}
#: What a leaf column holds in place of a value too long for it (``sha256:`` and the hex digest of
#: its UTF-8, cut to the column's length).
DIGEST_MARKER = "sha256:"


def leaf_value(value: object, limit: int) -> object:
    """What the leaf column of length ``limit`` holds for the entry's ``value``: the value itself
    if it fits, else :data:`DIGEST_MARKER` and its SHA-256 (the entry, hashed into the tree, keeps
    the whole value; the column is only an index for the filters, which map the value they look
    for the same way). A NUL is U+FFFD here, as PostgreSQL's parse of the entry has it
    (``store.PG_SLICE_NUL_SQL``); :func:`pg_leaf_value` is the same in SQL."""
    if not isinstance(value, str):
        return value
    value = value.replace("\x00", "\ufffd")
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return (DIGEST_MARKER + digest)[:limit]


def pg_leaf_value(expr: str, column: str) -> str:
    """PostgreSQL: :func:`leaf_value` of the text ``expr`` for ``column`` (lengths in characters,
    as ``varchar(n)`` counts them)."""
    limit = LEAF_LIMITS[column]
    digest = (
        f"left('{DIGEST_MARKER}' || encode(sha256(convert_to({expr}, 'UTF8')), 'hex'), {limit})"
    )
    return f"CASE WHEN length({expr}) <= {limit} THEN {expr} ELSE {digest} END"


#: Tables whose rows are never updated or deleted (enforced by triggers).
APPEND_ONLY = ("audit_leaves", "audit_tree", "audit_checkpoints")

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION trustplane_ledger_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit ledger table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$ LANGUAGE plpgsql
"""


def append_only_ddl(dialect: str) -> list[str]:
    """The triggers that refuse UPDATE/DELETE of leaves, tree nodes and checkpoints, and UPDATE of
    payloads (the retention purge deletes payload rows). Created by migration ``0002_ledger``."""
    if dialect == "postgresql":
        run = "FOR EACH ROW EXECUTE FUNCTION trustplane_ledger_append_only()"
        return [
            _PG_FUNCTION,
            *(
                f"CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t} {run}"
                for t in APPEND_ONLY
            ),
            f"CREATE TRIGGER audit_payloads_no_update BEFORE UPDATE ON audit_payloads {run}",
        ]
    return [
        *(
            f"CREATE TRIGGER {t}_no_{op.lower()} BEFORE {op} ON {t} BEGIN SELECT RAISE(ABORT, "
            f"'audit ledger table {t} is append-only: {op} refused'); END"
            for t in APPEND_ONLY
            for op in ("UPDATE", "DELETE")
        ),
        "CREATE TRIGGER audit_payloads_no_update BEFORE UPDATE ON audit_payloads BEGIN "
        "SELECT RAISE(ABORT, 'audit ledger payloads are never updated'); END",
    ]
