"""mandates: a partial index of the mandates whose expiry may still be due (docs/operations.md)

The maintenance task asks every minute, in every process, for mandates past ``effective_until``
whose expiry event is not out (``expired_unnotified``). Through ``ix_mandates_effective_until`` that
read every mandate that ever expired or was revoked before reaching the first due one: all of them,
each minute, once nothing is due. ``ix_mandates_expiry_due`` holds only the active and suspended
mandates not yet announced, so the read stops at the first row past ``now``. The query repeats the
index's predicate word for word (statuses written inline), which both planners need to use it.

Revision ID: 0013_mandate_expiry_due
Revises: 0012_brin_time_indexes
Create Date: 2026-12-06 03:55:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_mandate_expiry_due"
down_revision = "0012_brin_time_indexes"
branch_labels = None
depends_on = None

WHERE = "expiry_notified_at IS NULL AND status IN ('active', 'suspended')"


def upgrade() -> None:
    where = sa.text(WHERE)
    op.create_index(
        "ix_mandates_expiry_due",
        "mandates",
        ["effective_until"],
        postgresql_where=where,
        sqlite_where=where,
    )


def downgrade() -> None:
    op.drop_index("ix_mandates_expiry_due", table_name="mandates")
