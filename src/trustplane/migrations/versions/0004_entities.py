"""entity directory: legal names for LEIs (login and consent pages)

Revision ID: 0004_entities
Revises: 0002_policy
Create Date: 2026-12-02 09:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_entities"
down_revision = "0002_policy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "legal_entities",
        sa.Column("lei", sa.String(length=20), nullable=False),
        sa.Column("legal_name", sa.Text(), nullable=False),
        sa.Column("country", sa.String(length=2), nullable=True),
        sa.Column("registration_status", sa.String(length=32), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("lei"),
    )


def downgrade() -> None:
    op.drop_table("legal_entities")
