"""PostgreSQL: :func:`~trustplane.storage.driver_sql.insert_rows`, the hot path's multi-row insert.
Up to ``VALUES_ROWS`` rows it is a multi-row ``VALUES`` of scalar parameters, above one array per
column (``unnest``); either way the rows stored are the rows given, in their order when asked, and
a value the database refuses fails the whole insert."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest

from trustplane.audit.store import _PENDING, append_pending
from trustplane.storage.db import Database
from trustplane.storage.driver_sql import VALUES_ROWS, insert_rows, unnest_insert, values_insert

pytestmark = pytest.mark.postgres
SIZES = [1, 2, VALUES_ROWS, VALUES_ROWS + 1, 200]
CLAIM = (("issuer", "text"), ("jti", "text"), ("expires_at", "bigint"))
#: Values that could come back different if a parameter were encoded or cast the wrong way.
ODD_TEXT = ["", "NULL", "{a,b}", '"quoted", \\ and \t', "Zürich 東京 \U0001f4b6", "x" * 1_000_000]


@pytest.fixture
async def driver(pg_url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
    yield conn
    await conn.close()


def _pending(n: int) -> list[tuple[Any, ...]]:
    """``n`` ledger pending rows (text, bytea, bigint and NULL columns), each telling its place."""
    rows = []
    for i in range(n):
        odd = ODD_TEXT[i % len(ODD_TEXT)] if n < 50 else f"v{i}"
        nullable = None if i % 3 == 0 else odd
        salt = bytes([i % 256]) * 16
        rows.append((f'{{"i":{i}}}', odd, salt, nullable, "t", i, nullable, None, odd, "x"))
    return rows


async def _insert(driver: Any, rows: Sequence[Sequence[Any]]) -> str:
    sql, params = insert_rows("audit_pending", _PENDING, rows, ordered=True)
    await driver.execute(sql, *params)
    return sql


async def _stored(driver: Any) -> list[tuple[Any, ...]]:
    names = ", ".join(name for name, _ in _PENDING)
    records = await driver.fetch(f"SELECT {names} FROM audit_pending ORDER BY id")  # noqa: S608
    return [tuple(r) for r in records]


@pytest.mark.parametrize("n", SIZES)
async def test_the_rows_stored_are_the_rows_given_in_order(driver: Any, n: int) -> None:
    """The ids (a serial key) follow the rows' order, which the sequencer makes the leaves' order."""
    rows = _pending(n)
    sql = await _insert(driver, rows)
    assert ("unnest" in sql) == (n > VALUES_ROWS)
    assert await _stored(driver) == rows


@pytest.mark.parametrize("n", [1, 3, VALUES_ROWS])
async def test_values_and_arrays_store_the_same_rows(driver: Any, n: int) -> None:
    rows = _pending(n)
    await _insert(driver, rows)
    await driver.execute(
        unnest_insert("audit_pending", _PENDING, ordered=True),
        *(list(column) for column in zip(*rows, strict=True)),
    )
    stored = await _stored(driver)
    assert stored[:n] == stored[n:] == rows


@pytest.mark.parametrize("n", [1, VALUES_ROWS, VALUES_ROWS + 1])
@pytest.mark.parametrize(("bad", "error"), [("j" * 257, "too long"), ("a\x00b", "0x00")])
async def test_a_value_refused_fails_the_whole_insert(
    driver: Any, n: int, bad: str, error: str
) -> None:
    """The last row's ``jti`` is longer than its column, or holds a NUL: nothing is written."""
    rows: list[tuple[Any, ...]] = [("iss", f"j{i}", i) for i in range(n - 1)]
    rows.append(("iss", bad, 0))
    sql, params = insert_rows("used_jtis", CLAIM, rows)
    with pytest.raises(Exception, match=error):
        await driver.execute(sql, *params)
    assert await driver.fetchval("SELECT count(*) FROM used_jtis") == 0


async def test_a_null_is_typed_by_its_cast(driver: Any) -> None:
    """A row of NULLs alone: no other value gives the parameters their types."""
    rows = [("{}", "", b"", None, None, None, None, None, None, None)]
    await _insert(driver, rows)
    assert await _stored(driver) == rows


def test_a_values_text_per_size_and_its_parameters_row_after_row() -> None:
    sql, params = insert_rows("used_jtis", CLAIM, [("a", "b", 1), ("c", None, 2)], first=4)
    assert sql == (
        "INSERT INTO used_jtis (issuer, jti, expires_at) "
        "VALUES ($4::text, $5::text, $6::bigint), ($7::text, $8::text, $9::bigint)"
    )
    assert params == ["a", "b", 1, "c", None, 2]
    assert insert_rows("used_jtis", CLAIM, [("a", "b", 1)] * 2, first=4)[0] is sql  # cached
    ordered = values_insert("used_jtis", CLAIM, 2, ordered=True)
    assert ordered.endswith(
        "($4::text, $5::text, $6::bigint, 1)) AS r(issuer, jti, expires_at, ord) ORDER BY ord"
    )


def test_rows_of_the_wrong_width_are_refused() -> None:
    with pytest.raises(ValueError, match="rows of 3"):
        insert_rows("used_jtis", CLAIM, [("a", "b", 1), ("c", "d")])


async def test_the_same_through_sqlalchemy(pg_url: str) -> None:
    """``append_pending`` outside the writer (SQLAlchemy's asyncpg adapter) binds the same way."""
    names = ", ".join(name for name, _ in _PENDING)
    db = Database(pg_url)
    try:
        for n in (2, VALUES_ROWS + 1):
            async with db.transaction() as conn:
                await append_pending(conn, _pending(n))
        async with db.read() as conn:
            result = await conn.exec_driver_sql(f"SELECT {names} FROM audit_pending ORDER BY id")  # noqa: S608
            stored = [tuple(r) for r in result.all()]
    finally:
        await db.dispose()
    assert stored == _pending(2) + _pending(VALUES_ROWS + 1)
