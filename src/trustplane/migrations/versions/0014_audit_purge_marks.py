"""audit_purge_marks: how far the ledger's retention purge has gone, per event type (docs/ledger.md)

The purge ran each minute in every process with a retention period and read every leaf of each type
older than the type's cutoff, those purged long ago included (the leaves stay): 360-443 ms per type
at 1,000,000 leaves with nothing to delete, growing with the ledger's years. A row (type, cutoff_ms,
idx) records that every leaf of the type up to ``idx`` and older than ``cutoff_ms`` has no payload
left; the next round reads only the leaves of the type between that cutoff and the new one (a range
of ``ix_audit_leaves_type_time``) and the leaves integrated since ``idx`` (a range of the primary
key: a late leaf with an old time). No row: the first round reads as before, once.

Revision ID: 0014_audit_purge_marks
Revises: 0013_mandate_expiry_due
Create Date: 2026-12-06 04:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_audit_purge_marks"
down_revision = "0013_mandate_expiry_due"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_purge_marks",
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("cutoff_ms", sa.BigInteger(), nullable=False),
        sa.Column("idx", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("type", name=op.f("pk_audit_purge_marks")),
    )


def downgrade() -> None:
    op.drop_table("audit_purge_marks")
