"""a block-range (BRIN) index on PostgreSQL for the ledger's ``audit_leaves.time_ms``, which follows
the insertion order of an append-only table (docs/operations.md)

It was a B-tree that every token wrote into (two ledger leaves per client_credentials token: 2 of its
22 index entries), read only by ranges: the console's and retention's windows by time. A BRIN index keeps one
summary per block range instead of one entry per row: an insert into a summarized range touches it
only if the row widens the range's bounds, an insert into the new tail touches nothing until the
range is summarized (by autovacuum: ``autosummarize``; a query scans unsummarized ranges whole,
so results never depend on it). SQLite keeps its B-trees (no BRIN there; ``postgresql_using``).

Revision ID: 0012_brin_time_indexes
Revises: 0011_partial_indexes
Create Date: 2026-12-04 19:10:00
"""

from alembic import op

revision = "0012_brin_time_indexes"
down_revision = "0011_partial_indexes"
branch_labels = None
depends_on = None

#: (table, index, column)
_BRIN = (("audit_leaves", "ix_audit_leaves_time", "time_ms"),)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, name, column in _BRIN:
        op.drop_index(name, table_name=table)
        op.create_index(
            name,
            table,
            [column],
            postgresql_using="brin",
            postgresql_with={"autosummarize": "on"},
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, name, column in _BRIN:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, [column])
