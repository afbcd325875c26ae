"""an initial access token names the legal entity it registers, or is unbound by the operator's
explicit choice (docs/authorization.md, "Conformance: registration")

``any_lei`` records that choice (``trustplane registration-token create --any-lei``). A token with
neither an ``lei`` nor ``any_lei`` registers nothing: those are the tokens created unbound by default
before this revision, when nobody had asked for an unbound one; the operator creates them anew with
``--lei`` (or ``--any-lei``). Downgrading makes every token without an ``lei`` unbound again.

Revision ID: 0025_registration_token_any_lei
Revises: 0019_initial_access_token_lei
Create Date: 2026-12-06 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0025_registration_token_any_lei"
down_revision = "0024_audit_quarantine"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "initial_access_tokens",
        sa.Column("any_lei", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("initial_access_tokens") as batch:
        batch.drop_column("any_lei")
