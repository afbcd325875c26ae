"""The group-commit writer's SQLite thread (``storage/sqlite_batch.py``): a whole batch in one thread
call, inside the workers' turn and SQLite's write lock, committed before anyone is answered, a
poison item failing alone, and a handler that waits for something sent back to the event loop."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.storage import generations, sqlite_batch
from trustplane.storage.db import Database, sqlite_path
from trustplane.storage.turn import WriterTurn
from trustplane.storage.writer import GroupCommitWriter, WriterUnavailable

pytestmark = pytest.mark.asyncio

_BUMP = (
    "INSERT INTO cache_generations (name, generation) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET generation = generation + 1"
)


async def bump_rows(conn: AsyncConnection, payloads: Sequence[Any]) -> list[str]:
    """One generation row per payload; the payload ``"poison"`` is a row the database refuses (a
    NULL generation)."""
    rows = [(f"row-{p}", None if p == "poison" else 1) for p in payloads]
    await conn.exec_driver_sql(_BUMP, rows)
    return [f"row:{p}" for p in payloads]


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Database]:
    database = Database(sqlite_url)
    yield database
    await database.dispose()


@pytest.fixture
async def writer(db: Database) -> AsyncIterator[GroupCommitWriter]:
    w = GroupCommitWriter(db)
    yield w
    await w.stop()


def path_of(db: Database) -> Path:
    path = sqlite_path(db.url)
    assert path is not None
    return path


def generation(path: Path, name: str) -> int | None:
    with closing(sqlite3.connect(path)) as other:
        row = other.execute("SELECT generation FROM cache_generations WHERE name = ?", (name,))
        found = row.fetchone()
    return None if found is None else int(found[0])


async def settle(turns: int = 50) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_a_batch_runs_in_the_writers_thread_inside_the_turn_and_the_write_lock(
    db: Database, writer: GroupCommitWriter
) -> None:
    """While the handler runs: not on the event loop's thread, the workers' turn is held (another
    descriptor cannot take the flock) and so is SQLite's write lock (``BEGIN IMMEDIATE``)."""
    path = path_of(db)
    seen: dict[str, Any] = {}

    async def looks_around(conn: AsyncConnection, payloads: Sequence[Any]) -> list[None]:
        seen["thread"] = threading.current_thread().name
        fd = os.open(f"{path}.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen["turn"] = "free"
        except BlockingIOError:
            seen["turn"] = "held"
        finally:
            os.close(fd)
        with closing(sqlite3.connect(path, timeout=0)) as other:
            try:
                other.execute("BEGIN IMMEDIATE")
                seen["write_lock"] = "free"
            except sqlite3.OperationalError as exc:
                seen["write_lock"] = str(exc)
        await bump_rows(conn, payloads)
        return [None] * len(payloads)

    writer.register("look", looks_around, statements_only=True)
    writer.start()
    await writer.submit("look", 1)

    assert seen["thread"].startswith("group-commit")
    assert seen["turn"] == "held"
    assert seen["write_lock"] == "database is locked"
    assert generation(path, "row-1") == 1


async def test_the_thread_waits_for_the_turn_and_nobody_is_answered_before_the_commit(
    db: Database, writer: GroupCommitWriter
) -> None:
    """While another process holds the turn, the batch waits in the thread (the loop runs on);
    once it is free, every submitter finds its own row committed the moment it is answered."""
    path = path_of(db)
    writer.register("row", bump_rows, statements_only=True)
    writer.start()
    other = WriterTurn(path.with_name(path.name + ".writer-lock"))

    async def submit_then_look(i: int) -> int | None:
        await writer.submit("row", i)
        return generation(path, f"row-{i}")  # synchronous: nothing commits in between

    with other.held():
        first = asyncio.create_task(submit_then_look(0))
        await settle()
        rest = [asyncio.create_task(submit_then_look(i)) for i in range(1, 33)]
        await settle()
        assert not first.done()
        assert generation(path, "row-0") is None
    seen = await asyncio.gather(first, *rest)
    other.close()

    assert seen == [1] * 33
    assert writer.batches == 2  # the one that waited for the turn, then everything queued meanwhile


async def test_a_poison_item_fails_alone_in_the_thread(
    db: Database, writer: GroupCommitWriter
) -> None:
    """A batch with one row the database refuses: rolled back, retried one by one; only that
    submitter is told WriterUnavailable, every other row is committed once."""
    path = path_of(db)
    writer.register("row", bump_rows, statements_only=True)
    writer.start()
    other = WriterTurn(path.with_name(path.name + ".writer-lock"))
    payloads: list[Any] = ["held", 0, 1, "poison", 2]

    with other.held():  # so that everything after the first submission shares one batch
        tasks = [asyncio.create_task(writer.submit("row", p)) for p in payloads]
        await settle()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    other.close()

    assert isinstance(outcomes[3], WriterUnavailable)
    assert "NOT NULL" in str(outcomes[3])
    assert [o for i, o in enumerate(outcomes) if i != 3] == ["row:held", "row:0", "row:1", "row:2"]
    assert [generation(path, f"row-{p}") for p in ("held", 0, 1, 2)] == [1, 1, 1, 1]
    assert generation(path, "row-poison") is None


async def test_a_handler_that_waits_is_rolled_back_and_runs_on_the_loop(
    db: Database, writer: GroupCommitWriter
) -> None:
    """A handler registered as statements-only that awaits something else: its work in the thread
    is rolled back (the row is bumped once, not twice) and the batch runs on the event loop."""
    path = path_of(db)
    calls: list[str] = []

    async def bumps_then_waits(conn: AsyncConnection, payloads: Sequence[Any]) -> list[str]:
        calls.append(threading.current_thread().name)
        await bump_rows(conn, payloads)
        await asyncio.sleep(0)
        return [f"waited:{p}" for p in payloads]

    writer.register("waits", bumps_then_waits, statements_only=True)
    writer.register("row", bump_rows, statements_only=True)
    writer.start()

    assert await writer.submit("waits", 1) == "waited:1"
    assert await writer.submit("row", 2) == "row:2"

    assert calls[0].startswith("group-commit")
    assert calls[1] == threading.main_thread().name
    assert generation(path, "row-1") == 1
    assert generation(path, "row-2") == 1


async def test_the_sync_connection_answers_driver_sql_and_core_statements(db: Database) -> None:
    """What the handlers use: ``executemany`` for a list of rows, a Core statement with an
    expanding ``IN`` compiled for SQLite, results iterated, ``first``, ``scalar``, ``rowcount``."""
    with closing(sqlite_batch.connect(path_of(db))) as raw:
        conn: Any = sqlite_batch.SyncConnection(raw)
        sqlite_batch.run_to_end(bump_rows(conn, ["a", "b", "c"]))
        sqlite_batch.run_to_end(generations.bump(conn, "row-a"))
        table = generations.cache_generations
        query = table.select().where(table.c.name.in_({"row-a", "row-c"}))
        found = sqlite_batch.run_to_end(conn.execute(query.order_by(table.c.name)))
        count = sqlite_batch.run_to_end(
            conn.exec_driver_sql("SELECT count(*) FROM cache_generations")
        )

    assert list(found) == [("row-a", 2), ("row-c", 1)]
    assert count.scalar() == 3


async def test_the_writers_connection_is_durable_before_it_answers(db: Database) -> None:
    with closing(sqlite_batch.connect(path_of(db))) as raw:
        assert raw.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_the_sequencer_writes_inside_the_workers_turn(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger's write transaction holds the turn, so the writers queue behind it in the kernel
    (not in SQLite's polling busy handler): while it inserts the leaves, no other descriptor can
    take the flock."""
    from trustplane.audit import store
    from trustplane.audit.ledger import Ledger
    from trustplane.audit.sink import write_events
    from trustplane.audit_events import AuditEvent, AuditEventType
    from trustplane.settings import Settings

    path, seen = path_of(db), []
    insert_integrated = store.insert_integrated

    async def looking(*args: Any) -> None:
        fd = os.open(f"{path}.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("free")
        except BlockingIOError:
            seen.append("held")
        finally:
            os.close(fd)
        await insert_integrated(*args)

    monkeypatch.setattr(store, "insert_integrated", looking)
    settings = Settings(issuer="http://127.0.0.1:8000", data_dir=tmp_path)
    ledger = Ledger(settings, db, os.urandom(32))
    event = AuditEvent(type=AuditEventType.TOKEN_ISSUED, issuer=settings.issuer, decision="allow")
    async with db.transaction() as conn:
        await write_events(conn, [event])

    await ledger.integrate_all()

    assert seen
    assert set(seen) == {"held"}
