"""``security_event_cursors``: how far each publisher has published the ledger's security events.

One row per publisher name (``jetstream``); ``position`` is a ledger index: every security event
below it has been acknowledged by JetStream. Created by migration ``0008_as_events``.
"""

from sqlalchemy import BigInteger, Column, String, Table

from trustplane.storage.metadata import metadata

security_event_cursors = Table(
    "security_event_cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)
