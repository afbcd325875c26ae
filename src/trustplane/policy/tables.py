"""Policy tables: published bundles, the activation history, and the recorded decision inputs.

Exactly one bundle is active: ``policy_bundles.status = 'active'`` is unique (a partial unique index),
and activation is a compare-and-set on the active row (see ``policy.store``).
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    String,
    Table,
    Text,
    text,
)

from trustplane.storage.metadata import metadata

policy_bundles = Table(
    "policy_bundles",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("change_ref", String(64), nullable=False),
    Column("author", String(128), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("files", Text, nullable=False),
    Index(
        "uq_policy_bundles_one_active",
        "status",
        unique=True,
        sqlite_where=text("status = 'active'"),
        postgresql_where=text("status = 'active'"),
    ),
)

policy_activations = Table(
    "policy_activations",
    metadata,
    Column(
        "seq",
        Integer().with_variant(BigInteger(), "postgresql"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("version", String(64), nullable=False),
    Column("previous_version", String(64)),
    Column("action", String(16), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("change_ref", String(64)),
    Column("time_ms", BigInteger, nullable=False),
)

policy_decisions = Table(
    "policy_decisions",
    metadata,
    Column("decision_id", String(32), primary_key=True),
    Column("time_ms", BigInteger, nullable=False),
    Column("bundle_version", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("principal", String(300), nullable=False),
    Column("resource", String(300), nullable=False),
    Column("allowed", Boolean, nullable=False),
    Column("reason_ids", String(500), nullable=False),
    Column("latency_us", Integer, nullable=False),
    Column("correlation_id", String(128)),
    Column("inputs", Text),
    Index("ix_policy_decisions_time", "time_ms"),
)
