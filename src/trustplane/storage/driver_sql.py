"""Hand-written SQL for the few statements on the hot path, in each driver's own parameter style.

``Connection.exec_driver_sql`` hands parameters straight to the driver: no statement compilation and
no per-parameter type processing, which on a 32-request batch costs more than the database does.
Everything else uses SQLAlchemy Core.
"""

from __future__ import annotations

import functools


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
