"""``revoked_among``, the outcome batch's one revocation query, on SQLite and PostgreSQL: inside an
open transaction (the group-commit writer's batch; on PostgreSQL sent to the driver directly) and
outside one."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.protocol.revocations import SqlRevocationStore, revoked_among
from trustplane.storage.db import Database

pytestmark = pytest.mark.parametrize(
    "db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)


async def _revoke(conn: AsyncConnection, *jtis: str) -> None:
    for jti in jtis:
        await SqlRevocationStore().revoke(conn, jti, "c1", int(time.time()) + 300)


async def test_only_the_revoked_among_the_asked_are_answered(db_url: str) -> None:
    db = Database(db_url)
    try:
        async with db.transaction() as conn:
            await _revoke(conn, "gone-1", "gone-2", "elsewhere")
        asked = {"gone-1", "live-1", "gone-2", "live-2"}
        async with db.transaction() as conn:  # a transaction is open: the writer's case
            await conn.exec_driver_sql("SELECT 1")
            assert await revoked_among(conn, asked) == {"gone-1", "gone-2"}
            assert await revoked_among(conn, {"live-1"}) == set()
        async with db.read() as conn:
            assert await revoked_among(conn, asked) == {"gone-1", "gone-2"}
            assert await revoked_among(conn, {f"x{i}" for i in range(300)} | {"gone-2"}) == {
                "gone-2"
            }
    finally:
        await db.dispose()
