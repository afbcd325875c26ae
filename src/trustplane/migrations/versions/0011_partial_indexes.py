"""partial indexes: the ledger's and the SSF derivation index's lookups by a nullable column index
only the rows where it is set; the unused ix_audit_leaves_event_id is dropped (docs/ledger.md)

Every query on these columns asks ``column = value`` (or ``IN``), which implies ``column IS NOT
NULL``: both planners still use the partial index, and a row where the column is NULL (a
client_credentials token has no transaction, no partner...) writes no entry into it. On an existing
ledger the indexes are rebuilt, in the migration's transaction (writes to the table wait for it).

Revision ID: 0011_partial_indexes
Revises: 0010_surveillance
Create Date: 2026-12-04 17:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_partial_indexes"
down_revision = "0010_surveillance"
branch_labels = None
depends_on = None

#: (table, index, columns, the nullable column the partial index requires)
_PARTIAL = (
    ("audit_leaves", "ix_audit_leaves_transaction", ["transaction_id", "idx"], "transaction_id"),
    ("audit_leaves", "ix_audit_leaves_subject", ["subject", "idx"], "subject"),
    ("audit_leaves", "ix_audit_leaves_client", ["client_id", "idx"], "client_id"),
    ("audit_leaves", "ix_audit_leaves_partner", ["partner", "idx"], "partner"),
    ("ssf_derivations", "ix_ssf_derivations_jti", ["origin_iss", "origin_jti"], "origin_jti"),
    (
        "ssf_derivations",
        "ix_ssf_derivations_mandate",
        ["origin_iss", "origin_mandate"],
        "origin_mandate",
    ),
    ("ssf_derivations", "ix_ssf_derivations_sub", ["origin_iss", "origin_sub"], "origin_sub"),
)


def upgrade() -> None:
    op.drop_index("ix_audit_leaves_event_id", table_name="audit_leaves")
    for table, name, columns, column in _PARTIAL:
        where = sa.text(f"{column} IS NOT NULL")
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns, postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    for table, name, columns, _column in _PARTIAL:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns)
    op.create_index("ix_audit_leaves_event_id", "audit_leaves", ["event_id"])
