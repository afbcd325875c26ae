"""Migration ``0011_partial_indexes``: the ledger's lookups by a nullable column (and the SSF
derivation index's) use partial indexes, which both planners still choose for the queries the code
runs, on a table with enough rows; the migration upgrades and downgrades on both databases."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, event, func, select

from tests.conftest import PG_ADMIN_URL, require_service
from tests.storage.test_migrations import _admin
from trustplane.audit import store
from trustplane.audit.tables import audit_leaves
from trustplane.schema import metadata
from trustplane.ssf.tables import ssf_derivations
from trustplane.storage.db import Database
from trustplane.storage.migrate import alembic_config, upgrade

ROWS = 20_000
BEFORE = "0010_surveillance"

#: index -> the nullable column it is partial on
PARTIAL = {
    "ix_audit_leaves_transaction": "transaction_id",
    "ix_audit_leaves_subject": "subject",
    "ix_audit_leaves_client": "client_id",
    "ix_audit_leaves_partner": "partner",
    "ix_ssf_derivations_jti": "origin_jti",
    "ix_ssf_derivations_mandate": "origin_mandate",
    "ix_ssf_derivations_sub": "origin_sub",
}
LEAF_COLUMNS = ("transaction_id", "subject", "client_id", "partner")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def old_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A database migrated to the revision before the partial indexes, filled like a token
    workload's ledger: most leaves have no transaction and no partner; a few match each lookup."""
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'plans.db'}")
        name = ""
    else:
        require_service("PostgreSQL", "127.0.0.1", 5432)
        name = f"tp_plans_{secrets.token_hex(4)}"
        await _admin(f'CREATE DATABASE "{name}"')
        db = Database(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        await upgrade(db, BEFORE)
        await _fill(db)
        yield db
    finally:
        await db.dispose()
        if name:
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _fill(db: Database) -> None:
    leaves = [
        {
            "idx": i,
            "entry": "{}",
            "event_id": f"e{i}",
            "type": "console:action"
            if i % 1000 == 11
            else "oauth:token:issued"
            if i % 2
            else "policy:decision:allow",
            "time_ms": 1_700_000_000_000 + i,
            "subject": "s-rare" if i % 1000 == 9 else f"s{i % 50}" if i % 7 else None,
            "client_id": "c-rare" if i % 1000 == 5 else f"c{i % 50}",
            "partner": "p-rare" if i % 1000 == 3 else None,
            "transaction_id": f"t{i}" if i % 500 == 1 else None,
            "integrated_at": 1,
        }
        for i in range(ROWS)
    ]
    derived = [
        {
            "jti": f"d{i}",
            "client_id": "c",
            "expires_at": 2_000_000_000 + i,
            "origin_iss": f"https://iss{i % 4}.example",
            "origin_jti": f"o{i}" if i % 10 else None,
            "origin_sub": f"u{i % 2000}" if i % 3 else None,
            "origin_mandate": f"m{i}" if i % 200 == 7 else None,
        }
        for i in range(ROWS)
    ]
    async with db.transaction() as conn:
        await conn.execute(audit_leaves.insert(), leaves)
        await conn.execute(ssf_derivations.insert(), derived)


async def _downgrade(db: Database, revision: str) -> None:
    config = alembic_config(db.url)

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def _index_sql(db: Database) -> dict[str, str]:
    """Index name -> its definition, as the database holds it."""
    async with db.engine.connect() as conn:
        if db.is_sqlite:
            rows = await conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        else:
            rows = await conn.exec_driver_sql(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
            )
        return {str(r[0]): str(r[1]) for r in rows.all()}


async def _analyze(db: Database) -> None:
    async with db.engine.connect() as conn:
        await conn.exec_driver_sql("ANALYZE")
        await conn.commit()


class _Captured:
    """The statements a piece of code runs on one connection, with their parameters."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []

    def __call__(self, _c: Any, _cur: Any, statement: str, params: Any, *_rest: Any) -> None:
        self.statements.append((statement, params))


async def _plans(db: Database, run: Any) -> list[str]:
    """The plan of every statement ``run(conn)`` executes (EXPLAIN / EXPLAIN QUERY PLAN, with the
    statement's own parameters), each as one string."""
    captured = _Captured()
    out: list[str] = []
    async with db.engine.connect() as conn:
        event.listen(conn.sync_connection, "before_cursor_execute", captured)
        try:
            await run(conn)
        finally:
            event.remove(conn.sync_connection, "before_cursor_execute", captured)
        prefix = "EXPLAIN QUERY PLAN " if db.is_sqlite else "EXPLAIN "
        for statement, params in captured.statements:
            rows = (await conn.exec_driver_sql(prefix + statement, params)).all()
            out.append("\n".join(str(r[-1]) for r in rows))
    return out


def _partial(definition: str, column: str) -> bool:
    return "WHERE" in definition.upper() and f"{column} IS NOT NULL" in definition


async def test_upgrade_makes_the_lookups_partial_and_drops_the_event_id_index(
    old_db: Database,
) -> None:
    before = await _index_sql(old_db)
    assert "ix_audit_leaves_event_id" in before
    assert not any(_partial(before[name], column) for name, column in PARTIAL.items())

    await upgrade(old_db)

    after = await _index_sql(old_db)
    assert "ix_audit_leaves_event_id" not in after
    assert {
        name: _partial(after[name], column) for name, column in PARTIAL.items()
    } == dict.fromkeys(PARTIAL, True)
    for name in ("ix_audit_leaves_type_time", "ix_audit_leaves_time"):
        assert "WHERE" not in after[name].upper()


async def test_downgrade_restores_the_full_indexes(old_db: Database) -> None:
    before = await _index_sql(old_db)
    await upgrade(old_db)

    await _downgrade(old_db, BEFORE)

    assert await _index_sql(old_db) == before
    async with old_db.engine.connect() as conn:  # the rows are all still there, all indexed
        count = (await conn.exec_driver_sql("SELECT count(*) FROM audit_leaves")).scalar()
    assert count == ROWS
    await upgrade(old_db)
    assert "ix_audit_leaves_event_id" not in await _index_sql(old_db)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("transaction_id", "t1001"),
        ("subject", "s-rare"),
        ("client_id", "c-rare"),
        ("partner", "p-rare"),
    ],
)
async def test_ledger_lookups_use_the_partial_indexes(
    old_db: Database, column: str, value: str
) -> None:
    """``Ledger.search`` (the audit API's, console's and CLI's filters) and ``latest_where``."""
    await upgrade(old_db)
    await _analyze(old_db)
    index = next(name for name, c in PARTIAL.items() if c == column)

    async def search(conn: Any) -> None:
        await store.entries_where(conn, {column: value}, 0, ROWS, 100)

    async def latest(conn: Any) -> None:
        await store.latest_where(conn, {column: value}, 10)

    search_plans = await _plans(old_db, search)
    latest_plans = await _plans(old_db, latest)

    assert len(search_plans) == 1
    assert index in search_plans[0], search_plans[0]
    assert index in latest_plans[0], latest_plans[0]


@pytest.mark.parametrize(
    ("column", "value"),
    [("origin_jti", "o11"), ("origin_sub", "u5"), ("origin_mandate", "m1207")],
)
async def test_ssf_revocation_lookups_use_the_partial_indexes(
    old_db: Database, column: str, value: str
) -> None:
    """The SSF receiver's queries (``ssf.receiver``): by (issuer, column), then the tokens
    exchanged from the revoked ones by (issuer, origin_jti IN ...)."""
    await upgrade(old_db)
    await _analyze(old_db)
    index = next(name for name, c in PARTIAL.items() if c == column)
    t = ssf_derivations

    async def revoke(conn: Any) -> None:
        await conn.execute(
            select(t).where(t.c.origin_iss == "https://iss3.example", t.c[column] == value)
        )
        await conn.execute(
            select(t).where(
                t.c.origin_iss == "https://iss1.example", t.c.origin_jti.in_(["o1", "o5", "o9"])
            )
        )

    by_column, by_origin = await _plans(old_db, revoke)

    assert index in by_column, by_column
    assert "ix_ssf_derivations_jti" in by_origin, by_origin


async def test_time_and_type_queries_keep_their_full_indexes(old_db: Database) -> None:
    """The console's counts by type over a window, and a search by time alone (NOT NULL columns:
    nothing to leave out, the indexes stay whole)."""
    await upgrade(old_db)
    await _analyze(old_db)
    leaves = audit_leaves.c

    async def counts(conn: Any) -> None:
        since = leaves.time_ms >= 1_700_000_000_000
        await conn.execute(select(func.count()).where(leaves.type == "console:action", since))
        await conn.execute(
            select(func.count()).where(leaves.time_ms >= 1_700_000_000_000 + ROWS - 100)
        )

    by_type, by_time = await _plans(old_db, counts)

    assert "ix_audit_leaves_type_time" in by_type, by_type
    assert "ix_audit_leaves_time" in by_time, by_time


async def test_metadata_creates_the_migrated_predicates(old_db: Database, tmp_path: Path) -> None:
    """``metadata.create_all`` and the migration agree on the predicates too (Alembic's comparison,
    tests/storage/test_migrations.py, does not look at them)."""
    await upgrade(old_db)
    migrated = await _index_sql(old_db)
    name = ""
    if old_db.is_sqlite:
        fresh = Database(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")
    else:
        name = f"tp_plans_{secrets.token_hex(4)}"
        await _admin(f'CREATE DATABASE "{name}"')
        fresh = Database(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        async with fresh.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        created = await _index_sql(fresh)
    finally:
        await fresh.dispose()
        if name:
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    assert {n: created[n] for n in PARTIAL} == {n: migrated[n] for n in PARTIAL}
    assert "ix_audit_leaves_event_id" not in created
