"""The SQLAlchemy implementation of :class:`~trustplane.pep.idempotency.IdempotencyStore`, on SQLite
(aiosqlite) and PostgreSQL (asyncpg).

The table belongs to the resource server's own database, not to trustplane's: it is created by
``await store.create_schema()`` and is not part of trustplane's migration chain. Times are stored
as Unix milliseconds.

Every hot-path method is one hand-written statement, in the driver's own parameter style, on the
database's autocommit engine (:attr:`~trustplane.storage.db.Database.autocommit_engine`): the
statement is its own transaction, so there are no ``BEGIN``/``COMMIT`` round trips, no pool
pre-ping and no statement compilation. A claim is one
``INSERT ... ON CONFLICT DO UPDATE ... WHERE <takeover> RETURNING``: it inserts a new key, or takes
over an expired key or an abandoned lease, or changes nothing. Racing claimers serialise on the
primary key (PostgreSQL re-checks the ``WHERE`` on the row it locked; SQLite has one writer), so
exactly one wins. On SQLite, writes that arrive together share one transaction (one fsync) and
reads run on the calling thread (see :class:`_GroupCommit` and :func:`_inline_reader`). ``purge``,
off the hot path, uses the ordinary engine.
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from sqlalchemy import BigInteger, Column, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from trustplane.pep.idempotency import Claim, IdempotencyRecord, InTransaction, StoredResponse
from trustplane.storage.db import Database
from trustplane.storage.prune import delete_expired

IN_PROGRESS, COMPLETED = "in_progress", "completed"

metadata = MetaData()

idempotency_keys = Table(
    "pep_idempotency_keys",
    metadata,
    Column("scope", String(512), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("claim_token", String(64), nullable=False),
    Column("lease_until", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
    Column("status", Integer),
    Column("content_type", String(255)),
    Column("location", Text),
    Column("body", LargeBinary),
)

# Written with asyncpg's numbered placeholders; SQLite takes the same numbers as ``?NNN``.
_CLAIM = """\
INSERT INTO pep_idempotency_keys AS t
    (scope, "key", fingerprint, state, claim_token, lease_until, expires_at)
VALUES ($1, $2, $3, 'in_progress', $4, $5, $6)
ON CONFLICT (scope, "key") DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 'in_progress', claim_token = excluded.claim_token,
    lease_until = excluded.lease_until, expires_at = excluded.expires_at,
    status = NULL, content_type = NULL, location = NULL, body = NULL
WHERE t.expires_at <= $7
    OR (t.state = 'in_progress' AND t.lease_until <= $7 AND t.fingerprint = excluded.fingerprint)
    OR (t.state = 'in_progress' AND t.claim_token = excluded.claim_token)
RETURNING 1"""
#: The completed answer of a key stored without a claim (``InTransaction``): the claim's
#: conditions, and (a retry of this very statement after its commit) the same token.
_PUT = """\
INSERT INTO pep_idempotency_keys AS t (scope, "key", fingerprint, state, claim_token,
    lease_until, expires_at, status, body, content_type, location)
VALUES ($1, $2, $3, 'completed', $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (scope, "key") DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 'completed', claim_token = excluded.claim_token,
    lease_until = excluded.lease_until, expires_at = excluded.expires_at,
    status = excluded.status, content_type = excluded.content_type,
    location = excluded.location, body = excluded.body
WHERE t.expires_at <= $5
    OR (t.state = 'in_progress' AND t.lease_until <= $5 AND t.fingerprint = excluded.fingerprint)
    OR t.claim_token = excluded.claim_token
RETURNING 1"""
_GET = """\
SELECT fingerprint, state, lease_until, expires_at, status, body, content_type, location
FROM pep_idempotency_keys WHERE scope = $1 AND "key" = $2"""
_COMPLETE = """\
UPDATE pep_idempotency_keys
SET state = 'completed', status = $4, body = $5, content_type = $6, location = $7
WHERE scope = $1 AND "key" = $2 AND claim_token = $3 AND state = 'in_progress'
RETURNING 1"""
_RELEASE = """\
DELETE FROM pep_idempotency_keys
WHERE scope = $1 AND "key" = $2 AND claim_token = $3 AND state = 'in_progress'
RETURNING 1"""

# A pooled asyncpg connection that the server (or the network) dropped fails with one of these;
# InternalClientError ("cannot switch to state ...") when the server's FATAL message was waiting
# unread on the socket of an idle connection.
_PG_DISCONNECTS = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    OSError,
)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class SqlIdempotencyStore:
    def __init__(self, database: Database) -> None:
        self.db = database
        self._pg = database.dialect == "postgresql"
        #: PostgreSQL: a read is a round trip like the claim, so a new key is claimed without one
        #: (:class:`~trustplane.pep.idempotency.IdempotencyStore`); SQLite reads on the calling
        #: thread in tens of microseconds, and a claim is a (group-committed) write
        self.claims_first = self._pg
        self._writes = None if self._pg else _GroupCommit(lambda: database.autocommit_engine)
        self._reader = None if self._pg else _inline_reader(database)
        self._sql = {
            name: sql if self._pg else sql.replace("$", "?")
            for name, sql in [
                ("claim", _CLAIM),
                ("get", _GET),
                ("complete", _COMPLETE),
                ("release", _RELEASE),
                ("put", _PUT),
            ]
        }

    async def create_schema(self) -> None:
        """Create the table if it does not exist (the resource server calls this at start-up)."""
        async with self.db.transaction() as conn:
            await conn.run_sync(metadata.create_all)

    async def claim(
        self, claim: Claim, *, now: float, lease_until: float, expires_at: float
    ) -> bool:
        params = (
            *(claim.scope, claim.key, claim.fingerprint, claim.token),
            *(_ms(lease_until), _ms(expires_at), _ms(now)),
        )
        return bool(await self._fetch("claim", params))

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        found = self._read_inline((scope, key))
        if found is None:
            found = await self._fetch("get", (scope, key))
        return _record(found[0]) if found else None

    async def complete(self, claim: Claim, response: StoredResponse) -> bool:
        params = (
            *(claim.scope, claim.key, claim.token),
            *(response.status, response.body, response.content_type, response.location),
        )
        return bool(await self._fetch("complete", params))

    async def put(self, pending: InTransaction, response: StoredResponse) -> bool:
        params = (
            *(pending.scope, pending.key, pending.fingerprint, pending.token),
            *(_ms(pending.now), _ms(pending.expires_at), response.status, response.body),
            *(response.content_type, response.location),
        )
        return bool(await self._fetch("put", params))

    def in_transaction_on(self, database: Database) -> bool:
        """Whether an operation's statements on ``database`` may store this store's keys in their
        own transaction (:class:`~trustplane.pep.idempotency.InTransaction`): on PostgreSQL,
        when the keys are in that database. The operation's transaction then runs this store's
        ``put`` statement (``_PUT``: the same conditions) and writes nothing else if it stores
        no row."""
        return self._pg and database is self.db

    async def release(self, claim: Claim) -> bool:
        return bool(await self._fetch("release", (claim.scope, claim.key, claim.token)))

    async def purge(self, before: float) -> int:
        async with self.db.transaction() as conn:  # not on the hot path: the ordinary engine
            c = idempotency_keys.c  # expires_at <= before: below the next millisecond
            return await delete_expired(conn, idempotency_keys, c.expires_at, _ms(before) + 1)

    async def _fetch(self, name: str, params: tuple[Any, ...]) -> list[Sequence[Any]]:
        """Run one statement, committed on its own, on the driver's own connection object: one
        round trip on asyncpg, one hop to the connection's thread on aiosqlite (SQLAlchemy's
        cursor adapter takes four). Once more on a fresh connection if the pooled one was dead
        (checkouts are not pre-pinged). SQLite writes are committed in groups."""
        if self._writes is not None and name != "get":
            return await self._writes.write(self._sql[name], params)
        for attempt in (1, 2):
            async with self.db.autocommit_engine.connect() as conn:
                driver: Any = (await conn.get_raw_connection()).driver_connection
                try:
                    if self._pg:
                        return list(await driver.fetch(self._sql[name], *params))
                    return list(await driver.execute_fetchall(self._sql[name], params))
                except _PG_DISCONNECTS:
                    if not self._pg or attempt == 2:
                        raise
                    await conn.invalidate()
        raise AssertionError("unreachable")

    def _read_inline(self, params: tuple[Any, ...]) -> list[Sequence[Any]] | None:
        """On a SQLite file, the read runs on the calling thread: a primary-key lookup takes tens
        of microseconds, less than handing it to aiosqlite's thread and back. The connection never
        waits for a lock (``busy_timeout=0``); None (take the thread) when it would."""
        if self._reader is None:
            return None
        try:
            return self._reader.execute(self._sql["get"], params).fetchall()
        except sqlite3.OperationalError:
            return None


Rows = list[Sequence[Any]]
_Write = tuple[str, tuple[Any, ...], "asyncio.Future[Rows]"]


class _GroupCommit:
    """SQLite writes of this process: those that arrive while a commit is running are committed
    together in the next transaction (one fsync for all; nobody is answered before their commit).
    They queue here rather than in SQLite's busy handler, which polls the lock with sleeps across
    threads; other processes still meet the busy timeout. If a group's transaction fails, its
    writes are retried one by one, so that one failing write fails alone."""

    def __init__(self, engine: Callable[[], AsyncEngine]) -> None:
        self._engine = engine
        self._queue: list[_Write] = []
        self._task: asyncio.Task[None] | None = None

    async def write(self, sql: str, params: tuple[Any, ...]) -> Rows:
        future: asyncio.Future[Rows] = asyncio.get_running_loop().create_future()
        self._queue.append((sql, params, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        group: list[_Write] = []
        try:
            while self._queue:
                group, self._queue = self._queue, []
                await self._commit(group)
        finally:
            self._task = None
            for _sql, _params, future in group + self._queue:  # if this task was cancelled
                future.cancel()  # a no-op on the futures already answered
            self._queue = []

    async def _commit(self, group: list[_Write]) -> None:
        try:
            results = await self._run([(sql, params) for sql, params, _future in group])
        except Exception as exc:
            if len(group) == 1:
                if not group[0][2].done():
                    group[0][2].set_exception(exc)
                return
            for write in group:
                await self._commit([write])
            return
        for (_sql, _params, future), rows in zip(group, results, strict=True):
            if not future.done():  # its request may have been cancelled meanwhile
                future.set_result(rows)

    async def _run(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[Rows]:
        async with self._engine().connect() as conn:
            driver: Any = (await conn.get_raw_connection()).driver_connection
            if len(statements) == 1:  # a statement of its own: no BEGIN/COMMIT
                return [list(await driver.execute_fetchall(*statements[0]))]
            await driver.execute_fetchall("BEGIN IMMEDIATE")
            try:
                results = [list(await driver.execute_fetchall(*stmt)) for stmt in statements]
                await driver.execute_fetchall("COMMIT")
            except BaseException:
                if driver.in_transaction:
                    await driver.rollback()
                raise
            return results


def _inline_reader(database: Database) -> sqlite3.Connection | None:
    """A read-only connection to a SQLite file for :meth:`SqlIdempotencyStore._read_inline`."""
    path = make_url(database.url).database
    if not path or path == ":memory:":
        return None
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("PRAGMA busy_timeout = 0")
    reader.execute("PRAGMA query_only = 1")
    weakref.finalize(database, reader.close)  # closed with the database object, not before
    return reader


def record_of(row: Sequence[Any]) -> IdempotencyRecord:
    """The record of a row's ``fingerprint, state, lease_until, expires_at, status, body,
    content_type, location`` (an operation's statement that found its key held returns them)."""
    return _record(row)


def _record(row: Sequence[Any]) -> IdempotencyRecord:
    fingerprint, state, lease_until, expires_at, status, body, content_type, location = row
    response = None
    if state == COMPLETED:
        response = StoredResponse(status, bytes(body), content_type, location)
    return IdempotencyRecord(fingerprint, lease_until / 1000, expires_at / 1000, response)
