"""one answer per authorization request: the consent form is single-use (docs/authorization.md,
"Conformance: authorization endpoint and PAR")

Re-posting the consent form (the same sealed ``request`` field) within its lifetime issued another
code, and another mandate, for the same authorization request. Approving or denying now claims the
request's id in ``authorization_answers`` in the transaction that writes the answer; the row is
pruned a day after the request's deadline (``expires_at``).

Revision ID: 0027_authorization_answers
Revises: 0019_initial_access_token_lei
Create Date: 2026-12-06 10:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0027_authorization_answers"
down_revision = "0025_registration_token_any_lei"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "authorization_answers",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index("ix_authorization_answers_expires_at", "authorization_answers", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_authorization_answers_expires_at", table_name="authorization_answers")
    op.drop_table("authorization_answers")
