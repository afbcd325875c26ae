"""Trust profiles, versioned: every change is a new row; the newest version of a partner is current.

``partner_issuers`` maps each issuer to the one partner that owns it, so that two partners can never
claim the same ``iss`` (the primary key enforces it, also between racing writers)."""

from sqlalchemy import BigInteger, Column, Integer, PrimaryKeyConstraint, String, Table, Text

from trustplane.storage.metadata import metadata

partner_profiles = Table(
    "partner_profiles",
    metadata,
    Column("partner_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("document", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("changed_by", String(128), nullable=False),
    PrimaryKeyConstraint("partner_id", "version"),
)

partner_issuers = Table(
    "partner_issuers",
    metadata,
    Column("issuer", String(256), primary_key=True),
    Column("partner_id", String(64), nullable=False, index=True),
)
