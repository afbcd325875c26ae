"""Pruning what expired: every minute in every process, so each statement reads the expired rows
through the expiry column's index, never the whole table, on PostgreSQL whether or not the table
was ever ANALYZEd (autovacuum may be off: then it never is)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.authorize.answers import SqlAnswerStore
from trustplane.authorize.par import SqlPushedRequestStore
from trustplane.authorize.store import SqlCodeStore, SqlRefreshStore
from trustplane.policy.service import PolicyService
from trustplane.protocol.replay import SqlReplayCache
from trustplane.protocol.revocations import SqlRevocationStore, revoked_tokens
from trustplane.ssf.receiver import Derivations
from trustplane.storage.db import Database
from trustplane.storage.prune import delete_expired
from trustplane.storage.writer import GroupCommitWriter

ROWS = 5000
NOW = int(time.time())

#: table -> (PostgreSQL rows of ``i`` in 1..ROWS, a tenth expired; the prune, on db and conn).
Prune = Callable[[Database, AsyncConnection], Awaitable[int]]
CASES: dict[str, tuple[str, Prune]] = {
    "used_jtis": (  # its prune reads the clock: the rows' times are the insert's, not NOW
        "'iss', md5(i::text), extract(epoch from now())::bigint + (i - 500) * 60 + 30",
        lambda db, conn: SqlReplayCache(GroupCommitWriter(db), db).prune(),
    ),
    "revoked_tokens": (
        "md5(i::text), 'c', {now} + (i - 500) * 60 + 30, {now}",
        lambda db, conn: SqlRevocationStore().prune(conn, NOW),
    ),
    "authorization_codes": (
        "md5(i::text), 'c', 'u', 'l', 'm', 1, 'r', '', '[]', NULL, NULL, 'https://c', true, NULL,"
        " {now} + (i - 500) * 60 + 30, NULL, NULL, NULL, NULL, NULL",
        lambda db, conn: SqlCodeStore().prune(conn, NOW),
    ),
    "refresh_tokens": (
        "md5(i::text), 'f', 'c', 'u', 'l', 'm', 1, 'r', '', '[]', NULL, NULL, {now},"
        " {now} + (i - 500) * 60 + 30, NULL, NULL, md5(i::text), {now}",
        lambda db, conn: SqlRefreshStore().prune(conn, NOW),
    ),
    "authorization_answers": (
        "md5(i::text), {now} + (i - 500) * 60 + 30",
        lambda db, conn: SqlAnswerStore().prune(conn, NOW),
    ),
    "pushed_authorization_requests": (
        "md5(i::text), 'c', '{{}}', {now} + (i - 500) * 60 + 30, NULL",
        lambda db, conn: SqlPushedRequestStore().prune(conn, NOW),
    ),
    "ssf_derivations": (
        "md5(i::text), 'c', {now} + (i - 500) * 60 + 30, 'iss', NULL, NULL, NULL",
        lambda db, conn: Derivations("iss").prune(conn, NOW),
    ),
    "policy_decisions": (
        "md5(i::text), ({now} - 90 * 86400 + (i - 500) * 60 + 30)::bigint * 1000, 'v', 'a', 'p', 'r', true, '', 1,"
        " NULL, NULL",
        lambda db, conn: PolicyService(db, None, None, issuer="iss").prune(NOW * 1000),  # type: ignore[arg-type]
    ),
}


#: The expiry index each prune must read.
INDEXES = {
    "used_jtis": "ix_used_jtis_expires_at",
    "revoked_tokens": "ix_revoked_tokens_expires_at",
    "authorization_codes": "ix_authorization_codes_expires_at",
    "refresh_tokens": "ix_refresh_tokens_expires_at",
    "pushed_authorization_requests": "ix_pushed_authorization_requests_expires_at",
    "authorization_answers": "ix_authorization_answers_expires_at",
    "ssf_derivations": "ix_ssf_derivations_expires_at",
    "policy_decisions": "ix_policy_decisions_time",
}


async def _statements(db: Database, prune: Prune) -> tuple[int, list[tuple[str, Any]]]:
    """What the prune deleted, and the statements it ran with their parameters."""
    seen: list[tuple[str, Any]] = []

    def record(_c: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            seen.append((statement, parameters))

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        async with db.transaction() as conn:
            deleted = await prune(db, conn)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)
    return deleted, seen


async def _plans(db: Database, statements: list[tuple[str, Any]]) -> list[str]:
    async with db.read() as conn:
        return [
            "\n".join(r[0] for r in (await conn.exec_driver_sql(f"EXPLAIN {s}", p)).all())
            for s, p in statements
        ]


@pytest.mark.postgres
@pytest.mark.parametrize("table", sorted(CASES))
async def test_a_prune_reads_the_expired_rows_only_on_postgresql(pg_url: str, table: str) -> None:
    """Each prune was ``DELETE ... WHERE expires_at < now``: with no statistics (autovacuum off)
    PostgreSQL's planner takes a third of the rows to match and scans the whole table, every
    minute in every process (1,000,000 ``used_jtis``: every row, for the few that expired)."""
    values, prune = CASES[table]
    db = Database(pg_url)
    try:
        async with db.transaction() as conn:
            await conn.exec_driver_sql(
                f"INSERT INTO {table} SELECT {values.format(now=NOW)} "  # noqa: S608
                f"FROM generate_series(1, {ROWS}) i"
            )
        for analyzed in (False, True):
            if analyzed:
                async with db.transaction() as conn:
                    await conn.exec_driver_sql(f"ANALYZE {table}")
            deleted, statements = await _statements(db, prune)
            plans = await _plans(db, statements)
            assert deleted == (0 if analyzed else 499), (table, analyzed)
            assert len(plans) == 1, plans
            assert f"Seq Scan on {table}" not in plans[0], plans[0]
            index = INDEXES[table]
            assert f"Index Scan using {index}" in plans[0] or (
                f"Bitmap Index Scan on {index}" in plans[0]
            ), plans[0]
    finally:
        await db.dispose()


async def test_delete_expired_deletes_below_the_bound(db_url: str) -> None:
    """Rows below the bound go, the others stay (SQLite and PostgreSQL)."""
    db = Database(db_url)
    column = revoked_tokens.c.expires_at
    try:
        async with db.transaction() as conn:
            assert await delete_expired(conn, revoked_tokens, column, 110) == 0  # an empty table
            rows = [
                {"jti": f"j{i}", "client_id": "c", "expires_at": 100 + i, "revoked_at": 0}
                for i in range(20)
            ]
            await conn.execute(insert(revoked_tokens), rows)
            assert await delete_expired(conn, revoked_tokens, column, 110) == 10
            assert await delete_expired(conn, revoked_tokens, column, 110) == 0
            left = (await conn.execute(select(column))).scalars().all()
            assert sorted(left) == list(range(110, 120))
    finally:
        await db.dispose()
