"""an operator can revoke an initial access token (``trustplane registration-token revoke ID``)

``revoked_at`` is the instant of the revocation (epoch seconds); a revoked token registers nothing.
Downgrading drops the column: a revoked token that has not yet expired would be usable again, so the
downgrade also ends such tokens (``expires_at`` set to the revocation's instant).

Revision ID: 0030_registration_token_revoked
Revises: 0028_audit_pending_leaf_columns
Create Date: 2026-12-06 12:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0030_registration_token_revoked"
down_revision = "0028_audit_pending_leaf_columns"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("initial_access_tokens", sa.Column("revoked_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.execute(
        "UPDATE initial_access_tokens SET expires_at = revoked_at "
        "WHERE revoked_at IS NOT NULL AND expires_at > revoked_at"
    )
    with op.batch_alter_table("initial_access_tokens") as batch:
        batch.drop_column("revoked_at")
