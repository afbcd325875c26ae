"""policy decision point: bundles, activations, recorded decisions

Revision ID: 0002_policy
Revises: 0002_ledger
Create Date: 2026-11-29 19:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_policy"
down_revision = "0002_ledger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy_bundles",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("change_ref", sa.String(length=64), nullable=False),
        sa.Column("author", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("files", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_policy_bundles")),
    )
    op.create_index(
        "uq_policy_bundles_one_active",
        "policy_bundles",
        ["status"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "policy_activations",
        sa.Column(
            "seq",
            sa.Integer().with_variant(sa.BigInteger(), "postgresql"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("previous_version", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("change_ref", sa.String(length=64), nullable=True),
        sa.Column("time_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_policy_activations")),
    )
    op.create_table(
        "policy_decisions",
        sa.Column("decision_id", sa.String(length=32), nullable=False),
        sa.Column("time_ms", sa.BigInteger(), nullable=False),
        sa.Column("bundle_version", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("principal", sa.String(length=300), nullable=False),
        sa.Column("resource", sa.String(length=300), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("reason_ids", sa.String(length=500), nullable=False),
        sa.Column("latency_us", sa.Integer(), nullable=False),
        sa.Column("correlation_id", sa.String(length=128), nullable=True),
        sa.Column("inputs", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("decision_id", name=op.f("pk_policy_decisions")),
    )
    op.create_index("ix_policy_decisions_time", "policy_decisions", ["time_ms"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_policy_decisions_time", table_name="policy_decisions")
    op.drop_table("policy_decisions")
    op.drop_table("policy_activations")
    op.drop_index("uq_policy_bundles_one_active", table_name="policy_bundles")
    op.drop_table("policy_bundles")
