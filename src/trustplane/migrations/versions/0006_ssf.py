"""shared signals (OpenID SSF 1.0): streams, the SET outbox, tokens derived from partners' tokens

Revision ID: 0006_ssf
Revises: 0005_par
Create Date: 2026-12-02 12:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_ssf"
down_revision = "0005_par"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ssf_streams",
        sa.Column("stream_id", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=512), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("stream_id"),
    )
    op.create_index("ix_ssf_streams_client_id", "ssf_streams", ["client_id"])
    op.create_table(
        "ssf_outbox",
        sa.Column(
            "id",
            sa.Integer().with_variant(sa.BigInteger(), "postgresql"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("stream_id", sa.String(length=64), nullable=False),
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_error", sa.String(length=512), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ssf_outbox_due", "ssf_outbox", ["stream_id", "next_attempt_ms"])
    op.create_index("ux_ssf_outbox_jti", "ssf_outbox", ["stream_id", "jti"], unique=True)
    op.create_table(
        "ssf_derivations",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("origin_iss", sa.String(length=512), nullable=False),
        sa.Column("origin_jti", sa.String(length=256), nullable=True),
        sa.Column("origin_sub", sa.String(length=512), nullable=True),
        sa.Column("origin_mandate", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("jti"),
    )
    op.create_index("ix_ssf_derivations_expires_at", "ssf_derivations", ["expires_at"])
    op.create_index("ix_ssf_derivations_jti", "ssf_derivations", ["origin_iss", "origin_jti"])
    op.create_index("ix_ssf_derivations_sub", "ssf_derivations", ["origin_iss", "origin_sub"])
    op.create_index(
        "ix_ssf_derivations_mandate", "ssf_derivations", ["origin_iss", "origin_mandate"]
    )


def downgrade() -> None:
    op.drop_index("ix_ssf_derivations_mandate", table_name="ssf_derivations")
    op.drop_index("ix_ssf_derivations_sub", table_name="ssf_derivations")
    op.drop_index("ix_ssf_derivations_jti", table_name="ssf_derivations")
    op.drop_index("ix_ssf_derivations_expires_at", table_name="ssf_derivations")
    op.drop_table("ssf_derivations")
    op.drop_index("ux_ssf_outbox_jti", table_name="ssf_outbox")
    op.drop_index("ix_ssf_outbox_due", table_name="ssf_outbox")
    op.drop_table("ssf_outbox")
    op.drop_index("ix_ssf_streams_client_id", table_name="ssf_streams")
    op.drop_table("ssf_streams")
