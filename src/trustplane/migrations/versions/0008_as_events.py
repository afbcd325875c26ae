"""the authorization server's security events: the JetStream publisher's cursor over the ledger

Revision ID: 0008_as_events
Revises: 0007_sender_binding
Create Date: 2026-12-02 15:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_as_events"
down_revision = "0007_sender_binding"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "security_event_cursors",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("security_event_cursors")
