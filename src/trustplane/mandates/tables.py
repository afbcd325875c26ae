"""Mandate tables.

``mandates``          one row per mandate: lifecycle status, current version, and the current
                      version's parties and dates copied for filtering (the hot-path read is by PK);
``mandate_versions``  every version's terms, immutable once written;
``mandate_changes``   append-only history (created, accepted, amended, suspended, resumed, revoked);
``security_events``   outbox of signed RFC 8417 SETs, published to NATS when configured.
"""

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text, text

from trustplane.storage.metadata import metadata

_SEQ = Integer().with_variant(BigInteger(), "postgresql")
#: The mandates whose expiry event may still be due (``SqlMandateStore.expired_unnotified`` repeats
#: it word for word: a partial index is used only by a query whose conditions imply its predicate).
EXPIRY_DUE = "expiry_notified_at IS NULL AND status IN ('active', 'suspended')"
#: The SETs not yet published, by ``seq``: what the publisher reads (``published_at IS NULL ORDER
#: BY seq LIMIT n``). A partial index, which a SET leaves when it is published; the full index on
#: ``published_at`` it replaced (``0015_periodic_reads``) took an entry for the published row
#: version too (the mark is an update that is not HOT either way: its column is indexed).
UNPUBLISHED = "published_at IS NULL"

mandates = Table(
    "mandates",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("current_version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("status_reason", String(500)),
    Column("grantor_lei", String(20), nullable=False),
    Column("grantee_client_id", String(128), nullable=False),
    Column("effective_from", BigInteger, nullable=False),
    Column("effective_until", BigInteger),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("expiry_notified_at", BigInteger),
    Column("row_version", Integer, nullable=False),
    Index("ix_mandates_grantor_grantee_status", "grantor_lei", "grantee_client_id", "status"),
    Index("ix_mandates_grantee_client_id", "grantee_client_id"),
    Index("ix_mandates_effective_until", "effective_until"),
    Index(
        "ix_mandates_expiry_due",
        "effective_until",
        postgresql_where=text(EXPIRY_DUE),
        sqlite_where=text(EXPIRY_DUE),
    ),
)

mandate_versions = Table(
    "mandate_versions",
    metadata,
    Column("mandate_id", String(40), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("grantor_lei", String(20), nullable=False),
    Column("grantor_person", String(128)),
    Column("grantee_client_id", String(128), nullable=False),
    Column("grantee_lei", String(20), nullable=False),
    Column("scopes", Text, nullable=False),
    Column("authorization_details", Text, nullable=False),
    Column("details_digest", String(64), nullable=False),
    Column("effective_from", BigInteger, nullable=False),
    Column("effective_until", BigInteger),
    Column("legal_basis", String(32), nullable=False),
    Column("document_ref", String(500)),
    Column("revocation_path", String(500), nullable=False),
    Column("accepted_by", String(128)),
    Column("accepted_at", BigInteger),
    Column("created_by", String(128), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

mandate_changes = Table(
    "mandate_changes",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    Column("mandate_id", String(40), nullable=False),
    Column("version", Integer, nullable=False),
    Column("action", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("reason", String(500)),
    Column("at", BigInteger, nullable=False),
    Index("ix_mandate_changes_mandate_id_seq", "mandate_id", "seq"),
)

security_events = Table(
    "security_events",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    Column("jti", String(64), nullable=False, unique=True),
    Column("event_type", String(200), nullable=False),
    Column("mandate_id", String(40)),
    Column("mandate_version", Integer),
    Column("token", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("published_at", BigInteger),
    Index(
        "ix_security_events_unpublished",
        "seq",
        postgresql_where=text(UNPUBLISHED),
        sqlite_where=text(UNPUBLISHED),
    ),
    Index("ix_security_events_mandate_id", "mandate_id"),
)
