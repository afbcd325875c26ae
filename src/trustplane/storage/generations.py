"""Cross-process cache invalidation: a counter per cached thing, bumped in the writing transaction.

Each process keeps clients and keys in memory and reads these counters when told that one moved
(PostgreSQL ``NOTIFY``, :mod:`trustplane.storage.notify`) and every ``cache_refresh_interval`` seconds
(the fallback, and the only mechanism on SQLite); a process that wrote reloads at once.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, String, Table, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.storage.metadata import metadata
from trustplane.storage.notify import announce

cache_generations = Table(
    "cache_generations",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("generation", BigInteger, nullable=False),
)


async def bump(conn: AsyncConnection, name: str, *, notify: bool = True) -> None:
    """Increment ``name``'s generation inside the caller's transaction; on PostgreSQL the other
    processes are notified when it commits. ``notify=False``: a counter no process caches anything
    by (the readiness heartbeat), so no process is woken to read the counters for it."""
    result = await conn.execute(
        update(cache_generations)
        .where(cache_generations.c.name == name)
        .values(generation=cache_generations.c.generation + 1)
    )
    if result.rowcount == 0:
        dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        await conn.execute(
            dialect_insert(cache_generations)
            .values(name=name, generation=1)
            .on_conflict_do_update(
                index_elements=["name"], set_={"generation": cache_generations.c.generation + 1}
            )
        )
    if notify:
        await announce(conn, name)


async def read_all(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(select(cache_generations.c.name, cache_generations.c.generation))
    return {name: int(gen) for name, gen in rows}
