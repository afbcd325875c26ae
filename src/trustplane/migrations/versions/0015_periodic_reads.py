"""indexes for two periodic reads: surveillance_windows by (signal, bucket); security_events' SETs
not yet published, by seq (docs/surveillance.md, docs/ssf.md)

The windows' prune deleted ``WHERE signal = :s AND bucket < :before``; the primary key (signal, key,
bucket) holds a signal's buckets key by key, so the bound is no range of it and every window of the
signal was read, each minute in every process (a bitmap of its part of the key or, ANALYZEd, a
sequential scan of the table). ``ix_surveillance_windows_signal_bucket`` makes the deleted windows
one range.

The SET publisher reads ``published_at IS NULL ORDER BY seq LIMIT n``. ``ix_security_events_
published_at`` held every row version, the published ones too (publishing is an update that is not
HOT: its column is indexed); ``ix_security_events_unpublished`` (seq, partial) holds the SETs not
yet published, in the order they are read: one index entry fewer per SET published.

Revision ID: 0015_periodic_reads
Revises: 0014_audit_purge_marks
Create Date: 2026-12-06 06:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_periodic_reads"
down_revision = "0014_audit_purge_marks"
branch_labels = None
depends_on = None

UNPUBLISHED = "published_at IS NULL"


def upgrade() -> None:
    op.create_index(
        "ix_surveillance_windows_signal_bucket", "surveillance_windows", ["signal", "bucket"]
    )
    where = sa.text(UNPUBLISHED)
    op.create_index(
        "ix_security_events_unpublished",
        "security_events",
        ["seq"],
        postgresql_where=where,
        sqlite_where=where,
    )
    op.drop_index("ix_security_events_published_at", table_name="security_events")


def downgrade() -> None:
    op.create_index("ix_security_events_published_at", "security_events", ["published_at"])
    op.drop_index("ix_security_events_unpublished", table_name="security_events")
    op.drop_index("ix_surveillance_windows_signal_bucket", table_name="surveillance_windows")
