"""Registered clients and the initial access tokens that allow registering them. Secrets are hashed."""

from sqlalchemy import BigInteger, Boolean, Column, Integer, String, Table, Text, false

from trustplane.storage.metadata import metadata

clients = Table(
    "clients",
    metadata,
    Column("client_id", String(128), primary_key=True),
    Column("metadata", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("secret_hash", String(64)),
    Column("registration_token_hash", String(64)),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

initial_access_tokens = Table(
    "initial_access_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("description", String(200), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("max_uses", Integer),
    Column("uses", Integer, nullable=False, default=0),
    #: the one legal entity whose clients the token registers (migration 0019)
    Column("lei", String(20)),
    #: no ``lei``, by the operator's explicit choice: any legal entity (migration 0025). A token with
    #: neither (created unbound by default before 0025) registers nothing.
    Column("any_lei", Boolean, nullable=False, server_default=false()),
    #: when the operator revoked it (``registration-token revoke``, migration 0030); None: not revoked
    Column("revoked_at", BigInteger),
)
