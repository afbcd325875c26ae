"""The detector's state, shared by every process on the database (``0010_surveillance``).

- ``surveillance_cursor``: the next ledger leaf index to read (one row, ``ledger``).
- ``surveillance_delegation``: per client, the exchanges seen and the deepest ``act`` chain so far.
- ``surveillance_actor_pairs``: per client, every (subject, actor) pair seen, by a SHA-256 of the
  two (bounded width whatever the identifiers), with the leaf index that first showed it.
- ``surveillance_windows``: per signal and key (client or partner), the count in each fixed window
  and the leaf index that raised its alert (NULL: none yet), so that a window alerts once; indexed
  by (signal, bucket) too (``0015_periodic_reads``): the minute's prune deletes a signal's oldest
  buckets, which the primary key holds scattered among every key's windows.
"""

from sqlalchemy import BigInteger, Column, Index, Integer, PrimaryKeyConstraint, String, Table

from trustplane.storage.metadata import metadata

surveillance_cursor = Table(
    "surveillance_cursor",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

surveillance_delegation = Table(
    "surveillance_delegation",
    metadata,
    Column("client_id", String(128), primary_key=True),
    Column("exchanges", BigInteger, nullable=False),
    Column("max_depth", Integer, nullable=False),
)

surveillance_actor_pairs = Table(
    "surveillance_actor_pairs",
    metadata,
    Column("client_id", String(128), nullable=False),
    Column("pair", String(64), nullable=False),
    Column("first_index", BigInteger, nullable=False),
    PrimaryKeyConstraint("client_id", "pair"),
)

surveillance_windows = Table(
    "surveillance_windows",
    metadata,
    Column("signal", String(64), nullable=False),
    Column("key", String(256), nullable=False),
    Column("bucket", BigInteger, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("first_index", BigInteger, nullable=False),
    Column("alerted_index", BigInteger),
    PrimaryKeyConstraint("signal", "key", "bucket"),
    Index("ix_surveillance_windows_signal_bucket", "signal", "bucket"),
)
