"""Interim audit table: one row per event, append-only. The Merkle ledger replaces it."""

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text

from trustplane.storage.metadata import metadata

audit_events = Table(
    "audit_events",
    metadata,
    Column(
        "seq",
        Integer().with_variant(BigInteger(), "postgresql"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("event_id", String(32), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("time_ms", BigInteger, nullable=False),
    Column("client_id", String(128)),
    Column("subject", String(256)),
    Column("jti", String(256)),
    Column("transaction_id", String(128)),
    Column("body", Text, nullable=False),
    Index("ix_audit_events_type_time", "type", "time_ms"),
    Index("ix_audit_events_client_time", "client_id", "time_ms"),
    Index("ix_audit_events_transaction_id", "transaction_id"),
)
