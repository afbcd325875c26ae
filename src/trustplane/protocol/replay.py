"""Single-use ``jti`` values (RFC 7523 §3 item 7): a client assertion is accepted once until it expires.

Default store: a database table keyed by (issuer, jti), written through the group-commit writer so the
consumption is durable before the token is returned. With ``TRUSTPLANE_REDIS_URL`` set: Redis
``SET NX EXAT``. Either way, two racing requests with the same assertion: exactly one wins.

Redis unreachable or timing out fails closed: the use is not accepted and the request is refused 503
``temporarily_unavailable`` with ``Retry-After`` (:mod:`trustplane.dependencies`), never a 500.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    Column,
    PrimaryKeyConstraint,
    String,
    Table,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.dependencies import unavailable
from trustplane.storage.db import Database
from trustplane.storage.driver_sql import in_transaction, insert_rows, placeholder, values_clause
from trustplane.storage.metadata import metadata
from trustplane.storage.prune import delete_expired
from trustplane.storage.writer import GroupCommitWriter

KIND = "replay"

used_jtis = Table(
    "used_jtis",
    metadata,
    Column("issuer", String(256), nullable=False),
    Column("jti", String(256), nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
    PrimaryKeyConstraint("issuer", "jti"),
)


@dataclass(frozen=True, slots=True)
class ReplayUse:
    """One use of an assertion: ``jti`` from ``issuer``, remembered until ``expires_at``."""

    issuer: str
    jti: str
    expires_at: int


class ReplayCache(Protocol):
    #: True if a use can be handed to the group-commit writer together with other rows
    #: (``consume_batch``) instead of being consumed on its own.
    deferrable: bool

    async def consume(self, issuer: str, jti: str, expires_at: int) -> bool:
        """True exactly once per (issuer, jti) until ``expires_at``; durable when it returns True."""


#: PostgreSQL: one statement text for every batch size (three arrays and the time), prepared once
#: per connection by asyncpg.
_PG_UPSERT = (
    "INSERT INTO used_jtis (issuer, jti, expires_at) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) "
    "ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE used_jtis.expires_at < $4 RETURNING issuer, jti"
)


@functools.lru_cache(maxsize=256)
def _upsert(dialect: str, n: int) -> str:
    """SQLite: one statement per batch size: claim each (issuer, jti) unless a live row holds it."""
    return (
        f"INSERT INTO used_jtis (issuer, jti, expires_at) VALUES {values_clause(dialect, 3, n)} "  # noqa: S608 - placeholders only
        "ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = excluded.expires_at "
        f"WHERE used_jtis.expires_at < {placeholder(dialect, 3 * n + 1)} RETURNING issuer, jti"
    )


async def consume_batch(conn: AsyncConnection, uses: Sequence[ReplayUse]) -> list[bool]:
    """One upsert for the whole batch. A row is (re)claimed only if absent or already expired; the
    first of several identical uses within a batch wins, the rest lose without touching the database."""
    first, claims = _claims(uses)
    now = int(time.time())
    rows: Any
    if conn.dialect.name == "postgresql":
        driver = await in_transaction(conn)
        if driver is not None:
            return await consume_on_driver(driver, uses)
        rows = await conn.exec_driver_sql(_PG_UPSERT, (*_columns(claims), now))
    else:
        params: list[object] = []
        for use in claims:
            params += (use.issuer, use.jti, use.expires_at)
        params.append(now)
        rows = await conn.exec_driver_sql(_upsert(conn.dialect.name, len(claims)), tuple(params))
    return _won(uses, first, rows)


async def consume_on_driver(
    driver: Any, uses: Sequence[ReplayUse], alongside: tuple[str, Sequence[Any]] | None = None
) -> list[bool]:
    """:func:`consume_batch` on PostgreSQL, sent to asyncpg directly: ``driver`` is the connection
    :func:`~trustplane.storage.driver_sql.in_transaction` returned (a transaction is open on it).
    ``alongside``: an ``INSERT`` (its parameters numbered from ``$5``) and its parameters, run as a
    data-modifying CTE of the upsert itself: both in one execution and one round trip."""
    first, claims = _claims(uses)
    now = int(time.time())
    if alongside is None:
        rows = await driver.fetch(_PG_UPSERT, *_columns(claims), now)
    else:
        insert, params = alongside
        rows = await driver.fetch(_with(insert), *_columns(claims), now, *params)
    return _won(uses, first, rows)


@functools.lru_cache(maxsize=64)
def _with(insert: str) -> str:
    return f"WITH alongside AS ({insert}) {_PG_UPSERT}"


class Replayed(Exception):
    """A use given to :func:`claim_all` was not fresh, or a token it was told to check is revoked:
    its statement failed as a whole and wrote nothing."""


#: :func:`claim_all`'s claim: a plain ``INSERT``. A ``jti`` already in the table (used, or expired
#: and not yet pruned) violates the primary key and fails the statement as a whole, its other
#: inserts included; the batch then runs the transactional way (:func:`consume_on_driver`, whose
#: upsert takes an expired row back). No ``ON CONFLICT`` arbiter: PostgreSQL inserts each row
#: without the speculative insertion an upsert needs (a look-up of the key before the insert, a
#: speculative-insertion lock taken and released, and a second WAL record per row to confirm it).
#: Its parameters follow those of the ``alongside`` inserts (:func:`insert_rows`: a scalar per
#: value for a batch of up to ``VALUES_ROWS`` uses, an array per column above).
_CLAIM_COLUMNS = (("issuer", "text"), ("jti", "text"), ("expires_at", "bigint"))
#: The constraint a ``jti`` already used violates.
_USED = "pk_used_jtis"
_UNIQUE_VIOLATION = "23505"
#: The last step when the batch rests on tokens (a token exchange's subject tokens): a division by
#: zero if one of them is revoked, read in the statement's snapshot, so that nothing is written.
_UNREVOKED = (
    "SELECT 1 / (NOT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = ANY(${n}::text[])))::int"
)
_DIVISION_BY_ZERO = "22012"


@functools.lru_cache(maxsize=256)
def _all_or_nothing(inserts: tuple[str, ...], claim: str, unrevoked_at: int = 0) -> str:
    """One text per shape of batch: with :data:`~trustplane.storage.driver_sql.VALUES_ROWS` at
    32, a client_credentials batch of n tokens is one of 33 (n = 1..32 and above), held with the
    writer's other statements in asyncpg's cache of 100 a connection."""
    ctes = "".join(f"a{i} AS ({insert}), " for i, insert in enumerate(inserts))
    last = _UNREVOKED.format(n=unrevoked_at) if unrevoked_at else "SELECT 1"
    return f"WITH {ctes}claimed AS ({claim}) {last}"


async def claim_all(
    driver: Any,
    uses: Sequence[ReplayUse],
    alongside: Sequence[tuple[str, Sequence[Any]]],
    unrevoked: Sequence[str] = (),
) -> None:
    """PostgreSQL, on an asyncpg connection with no transaction open: claim every one of ``uses``
    and run the ``alongside`` inserts (their parameters numbered from 1 on, one insert's after the
    other's; the claim's own follow) in one statement, which commits on its own: one round trip,
    durable when it returns (``synchronous_commit`` on). All or nothing: if any use is not fresh
    (its ``jti`` is in the table, claimed or expired and not yet pruned, or twice in ``uses``), or
    any ``jti`` of ``unrevoked`` (our tokens the batch rests on: a token exchange's subject tokens)
    is revoked, nothing of it is written and :class:`Replayed` is raised (twice in ``uses``:
    without a round trip); the caller then runs the batch in a transaction, where an expired
    ``jti`` is claimed again. The revocations are read in the statement's own snapshot, as the
    transactional path's query read them in its own: one committed before the statement began
    fails it. Two statements racing for one ``jti``: the second waits for the first's commit and
    then fails on the key."""
    _, claims = _claims(uses)
    if len(claims) != len(uses):
        raise Replayed("the same jti twice in one batch")
    params = [param for _, values in alongside for param in values]
    rows = [(u.issuer, u.jti, u.expires_at) for u in claims]
    claim, claimed = insert_rows("used_jtis", _CLAIM_COLUMNS, rows, first=len(params) + 1)
    params += claimed
    at = len(params) + 1 if unrevoked else 0
    sql = _all_or_nothing(tuple(insert for insert, _ in alongside), claim, at)
    if unrevoked:
        params.append(list(unrevoked))
    try:
        await driver.execute(sql, *params)
    except Exception as exc:
        state = getattr(exc, "sqlstate", None)
        used = state == _UNIQUE_VIOLATION and getattr(exc, "constraint_name", None) == _USED
        if used or state == _DIVISION_BY_ZERO:
            raise Replayed(
                "a jti of the batch was already used or a token it rests on revoked"
            ) from exc
        raise


def _claims(uses: Sequence[ReplayUse]) -> tuple[dict[tuple[str, str], int], list[ReplayUse]]:
    """The index of each (issuer, jti)'s first use, and the distinct uses to claim, sorted so that
    two processes upserting overlapping batches lock rows in the same order and cannot deadlock on
    PostgreSQL."""
    first: dict[tuple[str, str], int] = {}
    for i, use in enumerate(uses):
        first.setdefault((use.issuer, use.jti), i)
    return first, [uses[first[key]] for key in sorted(first)]


def _columns(claims: Sequence[ReplayUse]) -> tuple[list[str], list[str], list[int]]:
    return [u.issuer for u in claims], [u.jti for u in claims], [u.expires_at for u in claims]


def _won(uses: Sequence[ReplayUse], first: dict[tuple[str, str], int], rows: Any) -> list[bool]:
    won = {(str(issuer), str(jti)) for issuer, jti in rows}
    return [first[(u.issuer, u.jti)] == i and (u.issuer, u.jti) in won for i, u in enumerate(uses)]


class SqlReplayCache:
    deferrable = True

    def __init__(self, writer: GroupCommitWriter, db: Database) -> None:
        self._writer, self._db = writer, db
        writer.register(KIND, consume_batch, statements_only=True)

    async def consume(self, issuer: str, jti: str, expires_at: int) -> bool:
        return bool(await self._writer.submit(KIND, ReplayUse(issuer, jti, expires_at)))

    async def prune(self) -> int:
        """Forget jtis whose assertions have expired (they would be refused on ``exp`` anyway)."""
        async with self._db.transaction() as conn:
            return await delete_expired(conn, used_jtis, used_jtis.c.expires_at, int(time.time()))


#: Bounds on one Redis call, so that a hung Redis costs a request seconds, not minutes.
REDIS_TIMEOUT = 2.0


class RedisReplayCache:
    deferrable = False

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self._redis = Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        #: redis-py's own classes (not the builtins): a lost or unreachable Redis.
        self._down: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)

    async def consume(self, issuer: str, jti: str, expires_at: int) -> bool:
        """Raises ``TemporarilyUnavailableError`` (503, ``Retry-After``) when Redis cannot answer."""
        key = f"trustplane:jti:{len(issuer)}:{issuer}:{jti}"
        ttl_at = max(expires_at, int(time.time()) + 1)
        try:
            return bool(await self._redis.set(key, b"1", nx=True, exat=ttl_at))
        except self._down as exc:
            raise unavailable("redis", exc, use="replay cache") from exc

    async def ping(self) -> None:
        """For readiness: raises if Redis does not answer."""
        await self._redis.ping()

    async def prune(self) -> int:
        return 0  # Redis expires keys itself

    async def aclose(self) -> None:
        await self._redis.aclose()
