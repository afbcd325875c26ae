"""initial access tokens may be bound to one legal entity (docs/authorization.md, "Conformance:
registration")

A client's ``lei`` is what the policies compare with a resource's owner and a mandate's grantee
(``entity.own``, ``entity.mandate``): whoever holds an unbound initial access token may register a
client of any legal entity. ``trustplane registration-token create --lei`` binds the token; a
registration with it must name that LEI. NULL: unbound (tokens created before this revision).

Revision ID: 0019_initial_access_token_lei
Revises: 0015_periodic_reads
Create Date: 2026-12-06 09:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0019_initial_access_token_lei"
down_revision = "0015_periodic_reads"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("initial_access_tokens", sa.Column("lei", sa.String(20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("initial_access_tokens") as batch:
        batch.drop_column("lei")
