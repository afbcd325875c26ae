"""Deleting what expired through the expiry column's index, whatever the planner knows of the table.

Every process prunes every minute (``Component.maintain``). ``DELETE FROM t WHERE expires_at < :now``
was a sequential scan of the whole table on PostgreSQL in the state a deployment runs in:
autovacuum is off, so no table is ever ANALYZEd, and the planner, with no statistics, takes an open
range to match a third of the rows, and a third of a table is cheaper to read in full (1,000,000
``used_jtis``: every row read each minute in each process, for the few that had expired). The range
closed at the oldest row (``column >= (SELECT min(column) ...)``, one probe of the index's end) is
estimated at 0.5 % of the rows whether or not the table has statistics (an inequality against a
value known only at run time takes PostgreSQL's default range selectivity), so the planner reads the
expired rows from the index and leaves the rest alone. SQLite's planner takes the index for either
form.
"""

from __future__ import annotations

from sqlalchemy import Column, Table, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Delete


def statement(table: Table, column: Column[int], before: int) -> Delete:
    """The delete of the rows of ``table`` whose ``column`` is below ``before``."""
    oldest = select(func.min(column)).scalar_subquery()
    return delete(table).where(column >= oldest, column < before)


async def delete_expired(
    conn: AsyncConnection, table: Table, column: Column[int], before: int
) -> int:
    """Delete the rows of ``table`` whose ``column`` (an indexed integer) is below ``before``, in
    the caller's transaction; returns how many went."""
    result = await conn.execute(statement(table, column, int(before)))
    return int(result.rowcount or 0)
