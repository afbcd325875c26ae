"""surveillance signals: the detector's cursor over the ledger, delegation profiles, actor pairs,
windowed counts (docs/surveillance.md)

Revision ID: 0010_surveillance
Revises: 0009_ledger_ingest
Create Date: 2026-12-02 15:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_surveillance"
down_revision = "0009_ledger_ingest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "surveillance_cursor",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "surveillance_delegation",
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("exchanges", sa.BigInteger(), nullable=False),
        sa.Column("max_depth", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("client_id"),
    )
    op.create_table(
        "surveillance_actor_pairs",
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("pair", sa.String(length=64), nullable=False),
        sa.Column("first_index", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", "pair"),
    )
    op.create_table(
        "surveillance_windows",
        sa.Column("signal", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=256), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("first_index", sa.BigInteger(), nullable=False),
        sa.Column("alerted_index", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("signal", "key", "bucket"),
    )


def downgrade() -> None:
    op.drop_table("surveillance_windows")
    op.drop_table("surveillance_actor_pairs")
    op.drop_table("surveillance_delegation")
    op.drop_table("surveillance_cursor")
