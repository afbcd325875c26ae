"""The SSF tables: streams (their configuration as the receiver set it), the outbox of signed SETs
waiting for delivery or acknowledgement, and the index of tokens derived from a partner's tokens."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text, text

from trustplane.storage.metadata import metadata


def _not_null(column: str) -> dict[str, Any]:
    where = text(f"{column} IS NOT NULL")
    return {"postgresql_where": where, "sqlite_where": where}


ssf_streams = Table(
    "ssf_streams",
    metadata,
    Column("stream_id", String(64), primary_key=True),
    Column("client_id", String(128), nullable=False, index=True),
    Column("config", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", String(512)),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

ssf_outbox = Table(
    "ssf_outbox",
    metadata,
    Column(
        "id",
        Integer().with_variant(BigInteger(), "postgresql"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("stream_id", String(64), nullable=False),
    Column("jti", String(64), nullable=False),
    Column("token", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    #: milliseconds: the push deliverer takes the row when this has passed
    Column("next_attempt_ms", BigInteger, nullable=False),
    Column("last_error", String(512)),
    Index("ix_ssf_outbox_due", "stream_id", "next_attempt_ms"),
    Index("ux_ssf_outbox_jti", "stream_id", "jti", unique=True),
)

ssf_derivations = Table(
    "ssf_derivations",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
    Column("origin_iss", String(512), nullable=False),
    Column("origin_jti", String(256)),
    Column("origin_sub", String(512)),
    #: the mandate the origin token rested on (its issuer's mandate id), if it named one
    Column("origin_mandate", String(128)),
    # partial (migration 0011_partial_indexes): the receiver asks origin_iss = ? AND <column> = ?
    # (or IN), never for NULL, and most derived tokens name no mandate
    Index("ix_ssf_derivations_jti", "origin_iss", "origin_jti", **_not_null("origin_jti")),
    Index(
        "ix_ssf_derivations_mandate", "origin_iss", "origin_mandate", **_not_null("origin_mandate")
    ),
    Index("ix_ssf_derivations_sub", "origin_iss", "origin_sub", **_not_null("origin_sub")),
)
