"""audit_pending carries the leaf columns (docs/ledger.md, "The pending row's leaf columns")

The sequencer's slice on PostgreSQL parsed every pending entry's JSON (``::jsonb``, 5.5-7.5 us an
entry in PostgreSQL) only to read the leaf's index columns. The append now writes them beside the
entry (already mapped by ``tables.leaf_value``: the ``sha256:`` digest of a value too long for the
leaf column, U+FFFD for a NUL), and the slice copies them. The columns are nullable: a row written
before this migration (or past the append path) has none, and its entry is parsed as before.

Revision ID: 0028_audit_pending_leaf_columns
Revises: 0027_authorization_answers
Create Date: 2026-12-06 12:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0028_audit_pending_leaf_columns"
down_revision = "0027_authorization_answers"
branch_labels = None
depends_on = None

#: Text, not the leaf's lengths: a value that would not fit the leaf fails the sequencer's insert
#: (and is quarantined), never the append.
_COLUMNS = (
    ("event_id", sa.Text()),
    ("type", sa.Text()),
    ("time_ms", sa.BigInteger()),
    ("subject", sa.Text()),
    ("client_id", sa.Text()),
    ("partner", sa.Text()),
    ("transaction_id", sa.Text()),
)


def upgrade() -> None:
    with op.batch_alter_table("audit_pending") as batch:
        for name, kind in _COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_pending") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
