"""The derivation index written with each issuance batch (``Derivations.observe``): the rows of a
batch of any size, a duplicate ``jti`` ignored (within the batch and against a committed row), on
SQLite and PostgreSQL, with and without a transaction already open on the driver connection (the
group-commit writer's case on PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.ssf.receiver import Derivations
from trustplane.ssf.tables import ssf_derivations
from trustplane.storage.db import Database

ISSUER = "https://as.example"
PARTNER = "https://idp.partner.example"


def issued(jti: str, payload: dict[str, Any], issuer: str = ISSUER) -> AuditEvent:
    return AuditEvent(
        type=AuditEventType.TOKEN_ISSUED, issuer=issuer, client_id="c1", jti=jti, payload=payload
    )


def exchanged(jti: str, subject_jti: str, mandate: str | None = None) -> AuditEvent:
    exchange: dict[str, Any] = {"subject_token": {"iss": ISSUER, "jti": subject_jti}}
    if mandate is not None:
        exchange["subject_mandate"] = {"id": mandate, "version": 1}
    return issued(jti, {"exp": 2_000_000_000, "exchange": exchange})


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.dispose()


async def rows(db: Database) -> set[tuple[Any, ...]]:
    t = ssf_derivations.c
    query = select(t.jti, t.client_id, t.expires_at, t.origin_iss, t.origin_jti, t.origin_sub,
                   t.origin_mandate)  # fmt: skip
    async with db.read() as conn:
        return {tuple(r) for r in (await conn.execute(query)).all()}


@pytest.mark.parametrize("opened", [False, True], ids=["lazy-transaction", "open-transaction"])
async def test_a_batch_is_indexed_once_per_jti(db: Database, opened: bool) -> None:
    observer = Derivations(ISSUER)
    batch = [
        exchanged("d1", "s1", mandate="m-1"),
        issued("d2", {"exp": 2_000_000_001, "origin": {"iss": PARTNER, "sub": "alice"}}),
        issued("plain", {"exp": 2_000_000_002}),  # rests on no other token: not indexed
        issued("foreign", {"exp": 1, "origin": {"iss": PARTNER}}, issuer="https://other.example"),
        exchanged("d1", "s-other"),  # the same jti again in the batch: the first row stands
    ]
    async with db.transaction() as conn:
        if opened:
            await conn.execute(text("SELECT 1"))
        await observer.observe(conn, batch)
    async with db.transaction() as conn:  # the next batch repeats a committed jti
        await observer.observe(conn, [exchanged("d1", "s-again"), exchanged("d3", "d1")])

    assert await rows(db) == {
        ("d1", "c1", 2_000_000_000, ISSUER, "s1", None, "m-1"),
        ("d2", "c1", 2_000_000_001, PARTNER, None, "alice", None),
        ("d3", "c1", 2_000_000_000, ISSUER, "d1", None, None),
    }


async def test_a_batch_with_nothing_to_index_writes_nothing(db: Database) -> None:
    async with db.transaction() as conn:
        await Derivations(ISSUER).observe(conn, [issued("plain", {"exp": 5})])
    assert await rows(db) == set()


@pytest.mark.parametrize("size", [40, 600], ids=["one-statement", "two-statements"])
async def test_sqlite_indexes_a_batch_in_one_statement_per_512_rows(
    sqlite_url: str, size: int
) -> None:
    """In the group-commit writer's thread (``storage.sqlite_batch``) a batch's rows go in one
    multi-row insert, not one statement step per row (each step lets go of the GIL): 40 rows are one
    execution of the insert, 600 are two; every row is there, a duplicate jti still ignored."""
    import sqlite3

    from trustplane.storage import sqlite_batch

    path = sqlite_url.split("///", 1)[1]
    raw = sqlite_batch.connect(Path(path))
    inserts: list[str] = []
    raw.set_trace_callback(
        lambda sql: inserts.append(sql) if sql.startswith("INSERT INTO ssf_derivations") else None
    )
    batch = [exchanged(f"d{i}", f"s{i}") for i in range(size)] + [exchanged("d0", "again")]
    conn = sqlite_batch.SyncConnection(raw)
    sqlite_batch.transact(raw, [(Derivations(ISSUER).observe, batch)], conn)
    raw.close()

    assert len(inserts) == (1 if size <= 512 else 2)
    check = sqlite3.connect(path)
    got = dict(check.execute("SELECT jti, origin_jti FROM ssf_derivations").fetchall())
    check.close()
    assert got == {f"d{i}": f"s{i}" for i in range(size)}
