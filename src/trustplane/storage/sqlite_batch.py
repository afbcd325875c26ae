"""A SQLite batch's whole transaction in one thread call, on a plain ``sqlite3`` connection.

Through aiosqlite every statement is a trip to the connection's thread and back (a queue, a future,
a wake-up of the event loop), and SQLAlchemy's adapter makes three of them per statement (cursor,
execute, fetch or close): a group-commit batch of ``BEGIN``, three inserts and ``COMMIT`` is about a
dozen round trips between two threads that contend for the GIL. Here the group-commit writer
(:mod:`trustplane.storage.writer`) hands the whole batch to its own thread once: the thread takes
the workers' turn (:mod:`trustplane.storage.turn`), runs ``BEGIN IMMEDIATE``, every handler and
``COMMIT`` (durable: ``synchronous=FULL``), and gives the results back in one wake-up.

The batch handlers are the same coroutines that run on PostgreSQL. :class:`SyncConnection` gives
them what they use of an ``AsyncConnection`` (``exec_driver_sql``, ``execute`` of a Core statement,
``dialect``), answered at once from the thread, so a handler's coroutine runs to its end without
ever suspending and :func:`run_to_end` drives it with a single ``send``. A handler that does wait for
something (it awaits a real future) cannot run here: :class:`Suspended` is raised, the batch is
rolled back, and the writer runs that kind through aiosqlite from then on.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from sqlalchemy.dialects.sqlite import pysqlite
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from trustplane.storage.db import SQLITE_PRAGMAS

_DIALECT = pysqlite.dialect(paramstyle="qmark")


class Suspended(Exception):
    """A handler awaited something that is not answered at once; it must run on the event loop.
    ``step``: its index in the batch's steps (:func:`transact`)."""

    def __init__(self, what: str, step: int = -1) -> None:
        super().__init__(what)
        self.step = step


class SyncResult:
    """The part of a SQLAlchemy ``Result`` the batch handlers use, over rows already fetched."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows, self.rowcount = rows, rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return list(self._rows)

    fetchall = all

    def first(self) -> Any | None:
        return self._rows[0] if self._rows else None

    def scalar(self) -> Any | None:
        return self._rows[0][0] if self._rows else None


class SyncConnection:
    """Stands in for an ``AsyncConnection`` inside the batch: each call runs on ``raw`` right away.

    Driver SQL goes to ``sqlite3`` unchanged (a list of parameter rows is ``executemany``); a Core
    statement is compiled for SQLite with its parameters inlined in order. Results are the driver's
    own values (no SQLAlchemy result processing: the hot path's statements return text and numbers).
    """

    dialect = _DIALECT

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw

    async def exec_driver_sql(self, sql: str, parameters: Any = None) -> SyncResult:
        if isinstance(parameters, list):
            cursor = self.raw.executemany(sql, parameters)
        else:
            cursor = self.raw.execute(sql, () if parameters is None else parameters)
        return _result(cursor)

    async def execute(self, statement: ClauseElement, parameters: Any = None) -> SyncResult:
        if parameters is not None:
            raise TypeError("SyncConnection.execute takes the statement's own parameters only")
        compiled = cast(
            SQLCompiler,
            statement.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True}),
        )
        values = compiled.construct_params()
        processors = (
            compiled._bind_processors
        )  # e.g. a DateTime's text form, as SQLAlchemy stores it
        args = []
        for name in compiled.positiontup or ():
            value = values[name]
            process = processors.get(name)
            args.append(process(value) if callable(process) else value)
        return _result(self.raw.execute(str(compiled), args))


def _result(cursor: sqlite3.Cursor) -> SyncResult:
    rows = cursor.fetchall() if cursor.description else []
    return SyncResult(rows, cursor.rowcount)


def run_to_end(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """The coroutine's return value, if it finishes without suspending; :class:`Suspended` if not."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise Suspended(getattr(coroutine, "__qualname__", repr(coroutine)))


def connect(path: Path) -> sqlite3.Connection:
    """The writer thread's connection: autocommit mode (the batch says ``BEGIN IMMEDIATE`` and
    ``COMMIT`` itself), the same pragmas as every other connection to the file (WAL,
    ``synchronous=FULL``)."""
    raw = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    for pragma in SQLITE_PRAGMAS:
        raw.execute(f"PRAGMA {pragma}")
    return raw


def transact(
    raw: sqlite3.Connection, steps: Sequence[tuple[Any, Sequence[Any]]], conn: SyncConnection
) -> list[Sequence[Any]]:
    """``BEGIN IMMEDIATE`` (the write lock at once, or wait for it: ``busy_timeout``), each
    ``(handler, payloads)`` in order, ``COMMIT``; on any failure ``ROLLBACK`` and re-raise. Returns
    each handler's results."""
    raw.execute("BEGIN IMMEDIATE")
    try:
        out = []
        for step, (handler, payloads) in enumerate(steps):
            try:
                out.append(run_to_end(handler(conn, payloads)))
            except Suspended as exc:
                raise Suspended(str(exc), step) from None
        raw.execute("COMMIT")
    except BaseException:
        if raw.in_transaction:
            raw.execute("ROLLBACK")
        raise
    return out
