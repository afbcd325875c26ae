"""Hand-written SQL for the few statements on the hot path, in each driver's own parameter style.

``Connection.exec_driver_sql`` hands parameters straight to the driver: no statement compilation and
no per-parameter type processing, which on a 32-request batch costs more than the database does.
Everything else uses SQLAlchemy Core.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


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
    table: str, columns: tuple[tuple[str, str], ...], *, ordered: bool = False
) -> str:
    """PostgreSQL: ``INSERT INTO table (...) SELECT ... FROM unnest($1::type[], ...)``, one array
    parameter per column (:func:`by_column`). One statement text whatever the number of rows, so
    asyncpg prepares it once per connection and the server plans and executes it once per batch
    (a multi-row ``VALUES`` is a new statement for each batch size; ``executemany`` executes once
    per row). ``columns``: (name, PostgreSQL type) pairs. ``ordered``: rows are inserted in the
    arrays' order (so a serial key follows it)."""
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(columns, 1))
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
