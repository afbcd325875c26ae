"""the ledger ingests the reference services' signed events: idempotency by (issuer, jti)

Revision ID: 0009_ledger_ingest
Revises: 0008_as_events
Create Date: 2026-12-02 15:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_ledger_ingest"
down_revision = "0008_as_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_ingested",
        sa.Column("issuer", sa.String(length=256), nullable=False),
        sa.Column("jti", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("transaction_id", sa.String(length=128), nullable=True),
        sa.Column("ingested_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("issuer", "jti"),
    )


def downgrade() -> None:
    op.drop_table("audit_ingested")
