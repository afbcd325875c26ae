"""Signing keys. ``private_key`` is AES-GCM ciphertext and is erased when the key is removed."""

from sqlalchemy import BigInteger, Column, Index, LargeBinary, String, Table, Text

from trustplane.storage.metadata import metadata

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("private_key", LargeBinary),
    Column("created_at", BigInteger, nullable=False),
    Column("activated_at", BigInteger),
    Column("retired_at", BigInteger),
    Column("remove_after", BigInteger),
    Column("removed_at", BigInteger),
    Index("ix_signing_keys_state", "state"),
)
