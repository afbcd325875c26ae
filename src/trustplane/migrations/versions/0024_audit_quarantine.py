"""audit_quarantine: pending ledger entries the sequencer could not integrate (docs/ledger.md,
"Quarantine")

One pending row that no integration could store (a subject longer than ``audit_leaves.subject`` on
PostgreSQL: "value too long") failed every integration after it: the evidence chain stopped. The
sequencer now moves such a row here, raw, and integrates in its place a placeholder leaf that commits
to the row's digests; the rows after it are integrated as before.

On PostgreSQL ``audit_pending`` gets ``vacuum_truncate = false``: a VACUUM that truncated the emptied
queue to no pages left its statistics saying "empty", and the queue's reads prepared on long-lived
connections were planned again as sequential scans and kept those plans while dead rows piled up
(``audit.store.pg_vacuum_pending``).

Revision ID: 0024_audit_quarantine
Revises: 0019_initial_access_token_lei
Create Date: 2026-12-06 10:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0024_audit_quarantine"
down_revision = "0019_initial_access_token_lei"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_quarantine",
        sa.Column("pending_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("salt", sa.LargeBinary(), nullable=False),
        sa.Column("error", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("event_id", sa.String(32), nullable=False),
        sa.Column("quarantined_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pending_id", name=op.f("pk_audit_quarantine")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE audit_pending SET (vacuum_truncate = false)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE audit_pending RESET (vacuum_truncate)")
    op.drop_table("audit_quarantine")
