"""Migration ``0012_brin_time_indexes``: on PostgreSQL the ledger's time index is a block-range
(BRIN) index, from the migration and from ``metadata`` alike, and the replay cache's expiry index
stays a B-tree; the range reads they serve (a window of the ledger by time, the prune) still find
every row, also rows written after the index was built (ranges not yet summarized); SQLite keeps
B-trees."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.audit.test_index_plans import _downgrade, _index_sql
from tests.conftest import PG_ADMIN_URL, require_service
from tests.storage.test_migrations import _admin
from trustplane.audit.tables import audit_leaves
from trustplane.protocol.replay import SqlReplayCache, used_jtis
from trustplane.schema import metadata
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade
from trustplane.storage.writer import GroupCommitWriter

BRIN = ("ix_audit_leaves_time",)
#: The replay cache's expiry index stays a B-tree: its table is deleted from as fast as it grows,
#: so reused pages would widen every block range's bounds and the prune would read the whole table.
BTREE = ("ix_used_jtis_expires_at",)
BEFORE = "0011_partial_indexes"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'brin.db'}")
        name = ""
    else:
        require_service("PostgreSQL", "127.0.0.1", 5432)
        name = f"tp_brin_{secrets.token_hex(4)}"
        await _admin(f'CREATE DATABASE "{name}"')
        database = Database(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        yield database
    finally:
        await database.dispose()
        if name:
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _brin(definition: str) -> bool:
    return "USING brin" in definition


async def test_upgrade_makes_them_brin_on_postgresql_and_downgrade_restores_btrees(
    db: Database,
) -> None:
    await upgrade(db, BEFORE)
    before = await _index_sql(db)
    assert not any(_brin(before[name]) for name in BRIN)

    await upgrade(db)

    after = await _index_sql(db)
    assert {name: _brin(after[name]) for name in BRIN} == dict.fromkeys(BRIN, not db.is_sqlite)
    assert not any(_brin(after[name]) for name in BTREE)
    await _downgrade(db, BEFORE)
    assert await _index_sql(db) == before


async def test_metadata_creates_what_the_migration_does(db: Database, tmp_path: Path) -> None:
    await upgrade(db)
    migrated = await _index_sql(db)
    if db.is_sqlite:
        fresh = Database(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")
    else:
        name = f"tp_brin_{secrets.token_hex(4)}"
        await _admin(f'CREATE DATABASE "{name}"')
        fresh = Database(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        async with fresh.transaction() as conn:
            await conn.run_sync(metadata.create_all)
        created = await _index_sql(fresh)
    finally:
        await fresh.dispose()
        if not db.is_sqlite:
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    assert {name: created[name] for name in BRIN} == {name: migrated[name] for name in BRIN}


async def test_range_reads_find_every_row_written_after_the_index(db: Database) -> None:
    """Rows inserted after the index was built sit in ranges no summary covers yet: the prune and
    a window by time still see all of them (and only them)."""
    await upgrade(db)
    now = int(time.time())
    jtis = [
        {"issuer": "https://iss.example", "jti": f"j{i}", "expires_at": now + (-5 if i % 3 else 60)}
        for i in range(3000)
    ]
    leaves = [
        {"idx": i, "entry": "{}", "event_id": f"e{i}", "type": "oauth:token:issued",
         "time_ms": 1_700_000_000_000 + i, "client_id": "c", "integrated_at": 1}
        for i in range(3000)
    ]  # fmt: skip
    async with db.transaction() as conn:
        await conn.execute(used_jtis.insert(), jtis)
        await conn.execute(audit_leaves.insert(), leaves)

    writer = GroupCommitWriter(db)
    pruned = await SqlReplayCache(writer, db).prune()

    async with db.engine.connect() as conn:
        left = (await conn.execute(select(func.count()).select_from(used_jtis))).scalar()
        window = select(func.count()).where(
            audit_leaves.c.time_ms >= 1_700_000_000_000 + 1000,
            audit_leaves.c.time_ms < 1_700_000_000_000 + 2500,
        )
        in_window = (await conn.execute(window)).scalar()
    assert (pruned, left) == (2000, 1000)
    assert in_window == 1500
