"""tamper-evident audit ledger: replaces the interim audit_events table

Revision ID: 0002_ledger
Revises: 0003_authz
Create Date: 2026-11-29 19:00:00

The interim table's rows are carried over as pending ledger entries (in their original order), so the
sequencer integrates them on first start. Leaves, tree nodes and checkpoints get triggers that refuse
UPDATE and DELETE; payload rows refuse UPDATE (the retention purge deletes them).
"""

import orjson
import sqlalchemy as sa
from alembic import op

from trustplane.audit.canonical import dict_entry_parts
from trustplane.audit.tables import append_only_ddl

revision = "0002_ledger"
down_revision = "0003_authz"
branch_labels = None
depends_on = None

_ID = sa.Integer().with_variant(sa.BigInteger(), "postgresql")


def _create_tables() -> None:
    op.create_table(
        "audit_pending",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("salt", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_pending")),
    )
    op.create_table(
        "audit_leaves",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("time_ms", sa.BigInteger(), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=True),
        sa.Column("client_id", sa.String(length=128), nullable=True),
        sa.Column("partner", sa.String(length=256), nullable=True),
        sa.Column("transaction_id", sa.String(length=128), nullable=True),
        sa.Column("integrated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("idx", name=op.f("pk_audit_leaves")),
    )
    for name, columns in (
        ("ix_audit_leaves_transaction", ["transaction_id", "idx"]),
        ("ix_audit_leaves_subject", ["subject", "idx"]),
        ("ix_audit_leaves_client", ["client_id", "idx"]),
        ("ix_audit_leaves_partner", ["partner", "idx"]),
        ("ix_audit_leaves_type_time", ["type", "time_ms"]),
        ("ix_audit_leaves_time", ["time_ms"]),
        ("ix_audit_leaves_event_id", ["event_id"]),
    ):
        op.create_index(name, "audit_leaves", columns, unique=False)
    op.create_table(
        "audit_tree",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_tree")),
    )
    op.create_table(
        "audit_payloads",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("salt", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("idx", name=op.f("pk_audit_payloads")),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("tree_size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root", sa.LargeBinary(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tree_size", name=op.f("pk_audit_checkpoints")),
    )
    op.create_table(
        "audit_log_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("root", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log_state")),
    )
    op.create_table(
        "audit_log_keys",
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("private_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_audit_log_keys")),
    )


def _create_triggers() -> None:
    for statement in append_only_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def _carry_over_interim_rows() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT body FROM audit_events ORDER BY seq")).scalars().all()
    pending = sa.table(
        "audit_pending",
        sa.column("entry", sa.Text),
        sa.column("payload", sa.Text),
        sa.column("salt", sa.LargeBinary),
    )
    values = []
    for body in rows:
        entry, payload, salt = dict_entry_parts(orjson.loads(body))
        values.append({"entry": entry.decode(), "payload": payload.decode(), "salt": salt})
    if values:
        bind.execute(pending.insert(), values)


def upgrade() -> None:
    _create_tables()
    _create_triggers()
    _carry_over_interim_rows()
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_type_time")
        batch_op.drop_index("ix_audit_events_transaction_id")
        batch_op.drop_index("ix_audit_events_client_time")
    op.drop_table("audit_events")


def downgrade() -> None:
    """Back to the interim table; the ledger's entries (with their payloads, where not purged) are
    copied into it, the proofs are lost."""
    op.create_table(
        "audit_events",
        sa.Column("seq", _ID, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("time_ms", sa.BigInteger(), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=True),
        sa.Column("subject", sa.String(length=256), nullable=True),
        sa.Column("jti", sa.String(length=256), nullable=True),
        sa.Column("transaction_id", sa.String(length=128), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_audit_events_event_id")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_events_client_time", ["client_id", "time_ms"], unique=False)
        batch_op.create_index("ix_audit_events_transaction_id", ["transaction_id"], unique=False)
        batch_op.create_index("ix_audit_events_type_time", ["type", "time_ms"], unique=False)
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT l.entry, p.payload FROM audit_leaves l "
            "LEFT JOIN audit_payloads p ON p.idx = l.idx ORDER BY l.idx"
        )
    ).all()
    events = sa.table(
        "audit_events",
        *(sa.column(c) for c in ("event_id", "type", "time_ms", "client_id", "subject", "jti")),
        sa.column("transaction_id"),
        sa.column("body"),
    )
    seen: set[str] = set()
    for entry, payload in rows:
        body = orjson.loads(entry)
        if body["event_id"] in seen:
            continue
        seen.add(body["event_id"])
        body.pop("payload_hash", None)
        body["payload"] = orjson.loads(payload) if payload else {}
        bind.execute(
            events.insert().values(
                event_id=body["event_id"],
                type=body["type"],
                time_ms=body["time"],
                client_id=body.get("client_id"),
                subject=body.get("subject"),
                jti=body.get("jti"),
                transaction_id=body.get("transaction_id"),
                body=orjson.dumps(body).decode(),
            )
        )
    if bind.dialect.name == "postgresql":
        op.execute("DROP FUNCTION trustplane_ledger_append_only() CASCADE")
    for table in (
        "audit_log_keys",
        "audit_log_state",
        "audit_checkpoints",
        "audit_payloads",
        "audit_tree",
        "audit_leaves",
        "audit_pending",
    ):
        op.drop_table(table)
