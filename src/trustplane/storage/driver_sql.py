"""Hand-written SQL for the few statements on the hot path, in each driver's own parameter style.

``Connection.exec_driver_sql`` hands parameters straight to the driver: no statement compilation and
no per-parameter type processing, which on a 32-request batch costs more than the database does.
On PostgreSQL the group-commit writer's statements go one step further, straight to asyncpg
(:func:`in_transaction`): SQLAlchemy's execution context, cursor adapter and result wrapping cost
about as much client CPU per statement as asyncpg's own round trip. Everything else uses
SQLAlchemy Core.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection


@functools.lru_cache(maxsize=256)
def values_clause(dialect: str, columns: int, rows: int) -> str:
    """``(?, ?), (?, ?)`` for SQLite (qmark), ``($1, $2), ($3, $4)`` for PostgreSQL (asyncpg)."""
    if dialect == "postgresql":
        return ", ".join(
            "(" + ", ".join(f"${r * columns + c + 1}" for c in range(columns)) + ")"
            for r in range(rows)
        )
    row = "(" + ", ".join("?" * columns) + ")"
    return ", ".join([row] * rows)


def placeholder(dialect: str, position: int) -> str:
    """The placeholder for the 1-based ``position``-th parameter."""
    return f"${position}" if dialect == "postgresql" else "?"


@functools.lru_cache(maxsize=64)
def unnest_insert(
    table: str, columns: tuple[tuple[str, str], ...], *, ordered: bool = False, first: int = 1
) -> str:
    """PostgreSQL: ``INSERT INTO table (...) SELECT ... FROM unnest($1::type[], ...)``, one array
    parameter per column (:func:`by_column`). One statement text whatever the number of rows, so
    asyncpg prepares it once per connection and the server plans and executes it once per batch
    (a multi-row ``VALUES`` is a new statement for each batch size; ``executemany`` executes once
    per row). ``columns``: (name, PostgreSQL type) pairs. ``ordered``: rows are inserted in the
    arrays' order (so a serial key follows it). ``first``: the number of the first parameter (the
    insert is part of a larger statement whose own parameters come first)."""
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(columns, first))
    if not ordered:
        return f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})"  # noqa: S608 - constants
    return (
        f"INSERT INTO {table} ({names}) SELECT {names} FROM unnest({arrays}) "  # noqa: S608 - constants
        f"WITH ORDINALITY AS r({names}, ord) ORDER BY ord"
    )


def by_column(rows: Sequence[Sequence[Any]], width: int) -> tuple[list[Any], ...]:
    """Rows turned into one list per column: the parameters of an :func:`unnest_insert`."""
    if not rows:
        return tuple([] for _ in range(width))
    return tuple(list(column) for column in zip(*rows, strict=True))


async def in_transaction(conn: AsyncConnection) -> Any | None:
    """The asyncpg connection under ``conn`` if a transaction is open on it (the group-commit
    writer's batch: ``storage.writer``), so a statement sent to it directly is part of that
    transaction; None on SQLite, and on PostgreSQL when no transaction is open yet (SQLAlchemy
    begins its own lazily, at the first statement it runs: a statement sent around it would
    commit on its own)."""
    if conn.dialect.name != "postgresql":
        return None
    driver = (await conn.get_raw_connection()).driver_connection
    return driver if driver is not None and driver.is_in_transaction() else None
