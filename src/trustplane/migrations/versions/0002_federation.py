"""federation: versioned partner trust profiles and the issuer -> partner map

Revision ID: 0002_federation
Revises: 0001
Create Date: 2026-11-29 19:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_federation"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "partner_profiles",
        sa.Column("partner_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("changed_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("partner_id", "version", name=op.f("pk_partner_profiles")),
    )
    op.create_table(
        "partner_issuers",
        sa.Column("issuer", sa.String(length=256), nullable=False),
        sa.Column("partner_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("issuer", name=op.f("pk_partner_issuers")),
    )
    with op.batch_alter_table("partner_issuers", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_partner_issuers_partner_id"), ["partner_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("partner_issuers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_partner_issuers_partner_id"))
    op.drop_table("partner_issuers")
    op.drop_table("partner_profiles")
