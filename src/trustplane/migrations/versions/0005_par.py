"""pushed authorization requests (RFC 9126): request_uri handles, single use, bound to the client

Revision ID: 0005_par
Revises: 0004_entities
Create Date: 2026-12-02 11:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_par"
down_revision = "0004_entities"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pushed_authorization_requests",
        sa.Column("handle_hash", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("used_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("handle_hash"),
    )
    op.create_index(
        "ix_pushed_authorization_requests_expires_at",
        "pushed_authorization_requests",
        ["expires_at"],
    )


def downgrade() -> None:
    op.drop_index(
        "ix_pushed_authorization_requests_expires_at", table_name="pushed_authorization_requests"
    )
    op.drop_table("pushed_authorization_requests")
