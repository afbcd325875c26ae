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
    per row). The hot path's inserts take it above :data:`VALUES_ROWS` rows only
    (:func:`insert_rows`): asyncpg encodes an array element by element. ``columns``: (name,
    PostgreSQL type) pairs. ``ordered``: rows are inserted in the arrays' order (so a serial key
    follows it). ``first``: the number of the first parameter (the insert is part of a larger
    statement whose own parameters come first)."""
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(columns, first))
    if not ordered:
        return f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})"  # noqa: S608 - constants
    return (
        f"INSERT INTO {table} ({names}) SELECT {names} FROM unnest({arrays}) "  # noqa: S608 - constants
        f"WITH ORDINALITY AS r({names}, ord) ORDER BY ord"
    )


#: PostgreSQL: an insert of up to this many rows binds one scalar parameter per value (a multi-row
#: ``VALUES``, :func:`values_insert`); a larger one, one array per column (:func:`unnest_insert`).
#: asyncpg encodes an array parameter element by element through three ``isinstance`` checks
#: against ``collections.abc`` classes (~4,000 client instructions an element) and a scalar in C:
#: a client_credentials token's 34 values cost the writer's process ~123,000 instructions fewer
#: as scalars, PostgreSQL ~2,300 more (docs/operations.md). 32 rows is a batch of 16 tokens'
#: ledger rows (two a token), the most the writer gathers before it stops waiting
#: (``storage.writer.GATHER_ENOUGH``); each row count is a statement of its own, prepared once per
#: connection, so the bound also caps the statements a shape of batch adds to asyncpg's cache.
VALUES_ROWS = 32


@functools.lru_cache(maxsize=512)
def values_insert(
    table: str,
    columns: tuple[tuple[str, str], ...],
    rows: int,
    *,
    ordered: bool = False,
    first: int = 1,
) -> str:
    """PostgreSQL: :func:`unnest_insert` for exactly ``rows`` rows as a multi-row ``VALUES``, each
    value a scalar parameter cast to its column's type (a NULL too), row after row: the parameters
    of :func:`flat`. ``ordered``: rows are inserted in the parameters' order (each row carries its
    ordinal, a constant, and the insert sorts on it, as the ``unnest`` sorts on ``WITH
    ORDINALITY``), so a serial key follows it."""
    names = ", ".join(name for name, _ in columns)
    width = len(columns)
    tail = ", {}" if ordered else ""
    row = "(" + ", ".join(f"${{}}::{kind}" for _, kind in columns) + tail + ")"
    values = ", ".join(
        row.format(*range(first + r * width, first + (r + 1) * width), r)
        if ordered
        else row.format(*range(first + r * width, first + (r + 1) * width))
        for r in range(rows)
    )
    if not ordered:
        return f"INSERT INTO {table} ({names}) VALUES {values}"  # noqa: S608 - constants
    return (
        f"INSERT INTO {table} ({names}) SELECT {names} FROM (VALUES {values}) "  # noqa: S608 - constants
        f"AS r({names}, ord) ORDER BY ord"
    )


def flat(rows: Sequence[Sequence[Any]], width: int) -> list[Any]:
    """Rows as one list of values, row after row: the parameters of a :func:`values_insert`."""
    params = [value for row in rows for value in row]
    if len(params) != len(rows) * width:
        raise ValueError(f"rows of {width} values expected")
    return params


def insert_rows(
    table: str,
    columns: tuple[tuple[str, str], ...],
    rows: Sequence[Sequence[Any]],
    *,
    ordered: bool = False,
    first: int = 1,
) -> tuple[str, Sequence[Any]]:
    """PostgreSQL: an insert of ``rows`` and its parameters (numbered from ``first``; as many as
    the sequence's length): :func:`values_insert` for 1 to :data:`VALUES_ROWS` rows,
    :func:`unnest_insert` otherwise. Either way the same rows, in order if ``ordered``, and a
    value the database refuses fails the whole insert."""
    width = len(columns)
    if 0 < len(rows) <= VALUES_ROWS:
        sql = values_insert(table, columns, len(rows), ordered=ordered, first=first)
        return sql, flat(rows, width)
    return unnest_insert(table, columns, ordered=ordered, first=first), by_column(rows, width)


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
