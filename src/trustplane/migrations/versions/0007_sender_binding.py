"""DPoP-bound authorization codes (RFC 9449 §10): the ``dpop_jkt`` of the authorization request

Revision ID: 0007_sender_binding
Revises: 0005_par
Create Date: 2026-12-02 12:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_sender_binding"
down_revision = "0006_ssf"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("authorization_codes") as batch:
        batch.add_column(sa.Column("dpop_jkt", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("authorization_codes") as batch:
        batch.drop_column("dpop_jkt")
