"""GroupCommitWriter: per-item results, batching, fail-closed batches, draining on stop."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import closing
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.storage import generations
from trustplane.storage.db import Database, sqlite_path
from trustplane.storage.writer import (
    GATHER_ENOUGH,
    GATHER_TURNS,
    GroupCommitWriter,
    WriterUnavailable,
)


class Recorder:
    """A handler that writes one generation row per payload and records each batch it is given.

    While ``gate`` is clear the handler waits, so that later submissions pile up in the queue."""

    def __init__(self, name: str, log: list[tuple[str, list[Any]]]) -> None:
        self.name, self.log = name, log
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, conn: AsyncConnection, payloads: Sequence[Any]) -> list[str]:
        self.log.append((self.name, list(payloads)))
        await self.gate.wait()
        for payload in payloads:
            await generations.bump(conn, f"{self.name}-{payload}")
        return [f"{self.name}:{p}" for p in payloads]


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.dispose()


@pytest.fixture
async def writer(db: Database) -> AsyncIterator[GroupCommitWriter]:
    w = GroupCommitWriter(db)
    yield w
    await w.stop()


async def committed(db: Database) -> dict[str, int]:
    async with db.read() as conn:
        return await generations.read_all(conn)


async def settle(count: int) -> None:
    """Let ``count`` submitted tasks reach the queue (no clock involved: just scheduler turns)."""
    for _ in range(10 * count + 10):
        await asyncio.sleep(0)


async def test_each_submitter_gets_its_own_result_in_order(
    db: Database, writer: GroupCommitWriter
) -> None:
    log: list[tuple[str, list[Any]]] = []
    rows = Recorder("row", log)
    writer.register("row", rows)
    writer.start()

    results = await asyncio.gather(*(writer.submit("row", i) for i in range(20)))

    assert results == [f"row:{i}" for i in range(20)]
    assert sorted(p for _, batch in log for p in batch) == list(range(20))
    assert writer.items == 20
    assert {f"row-{i}" for i in range(20)} <= (await committed(db)).keys()


async def test_concurrent_submissions_share_a_batch(
    db: Database, writer: GroupCommitWriter
) -> None:
    log: list[tuple[str, list[Any]]] = []
    rows = Recorder("row", log)
    writer.register("row", rows)
    writer.start()
    rows.gate.clear()
    first = asyncio.create_task(writer.submit("row", 0))
    await settle(1)  # batch [0] is now held inside the handler
    rest = [asyncio.create_task(writer.submit("row", i)) for i in range(1, 30)]
    await settle(30)

    rows.gate.set()
    results = await asyncio.gather(first, *rest)

    assert results == [f"row:{i}" for i in range(30)]
    assert [batch for _, batch in log] == [[0], list(range(1, 30))]
    assert (writer.batches, writer.items) == (2, 30)


async def _submit_after(writer: GroupCommitWriter, turns: int, payload: int) -> str:
    """Submit ``payload`` after ``turns`` turns of the event loop."""
    for _ in range(turns):
        await asyncio.sleep(0)
    return str(await writer.submit("row", payload))


async def test_writes_a_few_loop_turns_behind_the_first_join_its_commit(
    writer: GroupCommitWriter,
) -> None:
    """A request is a turn or two of the event loop from its write (its bytes parsed, its handler
    run): the writer lets GATHER_TURNS turns pass before it drains the queue, so writes that
    arrive that close behind the first share its commit instead of waiting for the next one."""
    log: list[tuple[str, list[Any]]] = []
    writer.register("row", Recorder("row", log))
    writer.start()

    results = await asyncio.gather(
        *(_submit_after(writer, turns, turns) for turns in range(GATHER_TURNS))
    )

    assert results == [f"row:{i}" for i in range(GATHER_TURNS)]
    assert [batch for _, batch in log] == [list(range(GATHER_TURNS))]
    assert (writer.batches, writer.items) == (1, GATHER_TURNS)


async def test_the_turns_end_once_enough_writes_are_queued(writer: GroupCommitWriter) -> None:
    """With GATHER_ENOUGH writes queued the writer drains at once: a write one turn behind them
    goes into the next commit (a far larger batch only makes everyone wait for one commit)."""
    log: list[tuple[str, list[Any]]] = []
    writer.register("row", Recorder("row", log))
    writer.start()

    queued = [_submit_after(writer, 0, i) for i in range(GATHER_ENOUGH)]
    await asyncio.gather(*queued, _submit_after(writer, 1, GATHER_ENOUGH))

    assert [batch for _, batch in log] == [list(range(GATHER_ENOUGH)), [GATHER_ENOUGH]]


async def test_kinds_run_in_registration_order_within_a_batch(writer: GroupCommitWriter) -> None:
    log: list[tuple[str, list[Any]]] = []
    gatekeeper, first, second = Recorder("gk", log), Recorder("a", log), Recorder("b", log)
    writer.register("gk", gatekeeper)
    writer.register("a", first)
    writer.register("b", second)
    writer.start()
    gatekeeper.gate.clear()
    held = asyncio.create_task(writer.submit("gk", 0))
    await settle(1)
    tasks = [
        asyncio.create_task(writer.submit(kind, n))
        for kind, n in (("b", 1), ("a", 2), ("b", 3), ("a", 4))
    ]
    await settle(4)

    gatekeeper.gate.set()
    results = await asyncio.gather(held, *tasks)

    assert results == ["gk:0", "b:1", "a:2", "b:3", "a:4"]
    assert log == [("gk", [0]), ("a", [2, 4]), ("b", [1, 3])]


class WritesThenFails:
    """A handler that writes its rows and then raises: the rows must not survive."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    async def __call__(self, conn: AsyncConnection, payloads: Sequence[Any]) -> list[Any]:
        self.calls.append(list(payloads))
        for payload in payloads:
            await generations.bump(conn, f"doomed-{payload}")
        raise RuntimeError("disk on fire")


async def _hold_then_batch(
    writer: GroupCommitWriter, gatekeeper: Recorder, submissions: list[tuple[str, Any]]
) -> list[Any]:
    """Hold one batch in the handler, queue ``submissions`` behind it (one batch), release."""
    gatekeeper.gate.clear()
    held = asyncio.create_task(writer.submit("gk", "held"))
    await settle(1)
    tasks = [asyncio.create_task(writer.submit(kind, payload)) for kind, payload in submissions]
    await settle(len(tasks))
    gatekeeper.gate.set()
    assert await held == "gk:held"
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def test_a_failing_handler_fails_every_item_and_commits_nothing(
    db: Database, writer: GroupCommitWriter
) -> None:
    gatekeeper, doomed = Recorder("gk", []), WritesThenFails()
    writer.register("gk", gatekeeper)
    writer.register("doomed", doomed)
    writer.start()

    outcomes = await _hold_then_batch(writer, gatekeeper, [("doomed", i) for i in range(5)])

    assert [type(o) for o in outcomes] == [WriterUnavailable] * 5
    assert all(str(o) == "RuntimeError('disk on fire')" for o in outcomes)
    assert doomed.calls[0] == [0, 1, 2, 3, 4]  # they really were one batch
    state = await committed(db)
    assert "gk-held" in state
    assert not any(name.startswith("doomed-") for name in state)
    assert writer.items == 1
    # The writer survives a failed batch.
    writer.register("row", Recorder("row", []))
    assert await writer.submit("row", 99) == "row:99"
    assert "row-99" in await committed(db)


async def test_a_poison_item_fails_alone_and_the_rest_of_its_batch_commits(
    db: Database, writer: GroupCommitWriter
) -> None:
    """A batch mixing good writes with one the database refuses: the batch's transaction fails,
    the writer retries the items one by one, so only the poison item gets WriterUnavailable and
    every other submitter gets its result with its row committed."""
    gatekeeper, rows, doomed = Recorder("gk", []), Recorder("row", []), WritesThenFails()
    writer.register("gk", gatekeeper)
    writer.register("row", rows)
    writer.register("doomed", doomed)
    writer.start()
    submissions = [("row", 0), ("row", 1), ("doomed", "x"), ("row", 2), ("gk", "late")]

    outcomes = await _hold_then_batch(writer, gatekeeper, submissions)

    state = await committed(db)
    assert isinstance(outcomes[2], WriterUnavailable)
    assert "doomed-x" not in state
    assert doomed.calls == [["x"], ["x"]]  # once in the batch, once alone
    good = [(k, p, o) for (k, p), o in zip(submissions, outcomes, strict=True) if k != "doomed"]
    assert [o for _, _, o in good] == [f"{k}:{p}" for k, p, _ in good]
    assert {f"{k}-{p}" for k, p, _ in good} <= state.keys()


async def test_no_submitter_is_answered_before_its_commit(sqlite_url: str) -> None:
    """The answer to a write comes only after the COMMIT of the batch that holds it: each submitter,
    the moment it is answered and before it yields to the event loop again, finds its row through
    another connection (plain ``sqlite3``, synchronous, so nothing can commit in between)."""
    db = Database(sqlite_url)
    writer = GroupCommitWriter(db)
    writer.register("row", Recorder("row", []))
    writer.start()
    path = sqlite_path(sqlite_url)
    assert path is not None

    async def submit_then_look(i: int) -> Any:
        await writer.submit("row", i)
        with closing(sqlite3.connect(path)) as other:
            sql = "SELECT generation FROM cache_generations WHERE name = ?"
            return other.execute(sql, (f"row-{i}",)).fetchone()

    try:
        seen = await asyncio.gather(*(submit_then_look(i) for i in range(64)))
    finally:
        await writer.stop()
        await db.dispose()

    assert seen == [(1,)] * 64
    assert writer.batches < 64  # they did share commits


@pytest.mark.postgres
async def test_a_batch_whose_connection_died_runs_again_on_a_fresh_one(pg_url: str) -> None:
    """The writer's connection is killed under the batch (the handler's first call terminates its
    own backend, before anything is committed): the batch runs once more on a new connection and
    every submitter gets its result."""
    db = Database(pg_url)
    writer = GroupCommitWriter(db)
    calls: list[list[Any]] = []

    async def dies_once(conn: AsyncConnection, payloads: Sequence[Any]) -> list[str]:
        calls.append(list(payloads))
        if len(calls) == 1:
            await conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        for payload in payloads:
            await generations.bump(conn, f"row-{payload}")
        return [f"row:{p}" for p in payloads]

    writer.register("row", dies_once)
    writer.start()
    try:
        assert await writer.submit("row", 1) == "row:1"
        assert await writer.submit("row", 2) == "row:2"
        state = await committed(db)
    finally:
        await writer.stop()
        await db.dispose()

    assert calls == [[1], [1], [2]]
    assert (state["row-1"], state["row-2"]) == (1, 1)
    assert writer.batches == 2


@pytest.mark.postgres
async def test_a_batch_whose_transaction_failed_is_not_reported_committed(pg_url: str) -> None:
    """A handler that catches a statement's error leaves the transaction failed; PostgreSQL then
    answers ``COMMIT`` with ``ROLLBACK`` and no error. Nothing was committed, so the submitter is
    told ``WriterUnavailable`` (it was told its write was durable), and the next batch commits."""
    import asyncpg

    db = Database(pg_url)
    writer = GroupCommitWriter(db)

    async def swallows(conn: AsyncConnection, payloads: Sequence[Any]) -> list[str]:
        for payload in payloads:
            await generations.bump(conn, f"row-{payload}")
            if payload == "bad":
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                with pytest.raises(asyncpg.DivisionByZeroError):
                    await driver.execute("SELECT 1 / 0")
        return [f"row:{p}" for p in payloads]

    writer.register("row", swallows)
    writer.start()
    try:
        with pytest.raises(WriterUnavailable, match="ROLLBACK"):
            await writer.submit("row", "bad")
        assert await writer.submit("row", "good") == "row:good"
        state = await committed(db)
    finally:
        await writer.stop()
        await db.dispose()
    assert "row-bad" not in state
    assert state["row-good"] == 1


@pytest.mark.postgres
async def test_connections_the_server_closed_are_replaced_without_a_ping(pg_url: str) -> None:
    """No ``pool_pre_ping``: after every backend of the pool and of the writer is terminated
    (``pg_terminate_backend``), the next unit of work and the next write still succeed."""
    db = Database(pg_url)
    writer = GroupCommitWriter(db)
    writer.register("row", Recorder("row", []))
    writer.start()
    try:
        assert await writer.submit("row", 1) == "row:1"
        async with db.transaction() as conn:  # a second pooled connection, idle afterwards
            await generations.bump(conn, "before")
        killer = Database(pg_url)
        try:
            async with killer.transaction() as conn:
                # the timeout makes each call wait until its backend has exited
                killed = await conn.exec_driver_sql(
                    "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                assert killed.scalar_one() >= 2
        finally:
            await killer.dispose()
        await settle(1)  # a few loop turns: the driver reads the closed sockets

        async with db.transaction() as conn:
            await generations.bump(conn, "after")
        assert await writer.submit("row", 2) == "row:2"
        state = await committed(db)
    finally:
        await writer.stop()
        await db.dispose()
    assert {"before", "after", "row-1", "row-2"} <= state.keys()


async def test_submit_while_stopping_is_refused(writer: GroupCommitWriter) -> None:
    gatekeeper = Recorder("gk", [])
    writer.register("gk", gatekeeper)
    writer.start()
    gatekeeper.gate.clear()
    held = asyncio.create_task(writer.submit("gk", 0))
    await settle(1)
    stopping = asyncio.create_task(writer.stop())
    await settle(1)

    with pytest.raises(WriterUnavailable):
        await writer.submit("gk", 1)
    gatekeeper.gate.set()
    assert await held == "gk:0"
    await stopping


async def test_a_handler_returning_the_wrong_number_of_results_fails_closed(
    db: Database, writer: GroupCommitWriter
) -> None:
    async def short(conn: AsyncConnection, payloads: Sequence[Any]) -> list[Any]:
        await generations.bump(conn, "short")
        return []

    writer.register("short", short)
    writer.start()

    with pytest.raises(WriterUnavailable):
        await writer.submit("short", 1)
    assert "short" not in await committed(db)


async def test_unknown_kind_is_a_key_error(writer: GroupCommitWriter) -> None:
    writer.register("row", Recorder("row", []))
    writer.start()

    with pytest.raises(KeyError, match=r"no handler registered for 'nope'"):
        await writer.submit("nope", 1)
    assert writer.items == 0


async def test_submit_before_start_is_refused(writer: GroupCommitWriter) -> None:
    writer.register("row", Recorder("row", []))

    with pytest.raises(WriterUnavailable, match=r"^writer is not running$"):
        await writer.submit("row", 1)


async def test_stop_drains_what_is_queued(db: Database, writer: GroupCommitWriter) -> None:
    log: list[tuple[str, list[Any]]] = []
    rows = Recorder("row", log)
    writer.register("row", rows)
    writer.start()
    rows.gate.clear()
    tasks = [asyncio.create_task(writer.submit("row", i)) for i in range(10)]
    await settle(10)
    stopping = asyncio.create_task(writer.stop())
    await settle(1)
    assert not stopping.done()

    rows.gate.set()
    await stopping

    assert [t.result() for t in tasks] == [f"row:{i}" for i in range(10)]
    assert {f"row-{i}" for i in range(10)} <= (await committed(db)).keys()
    with pytest.raises(WriterUnavailable):
        await writer.submit("row", 11)
    await writer.stop()  # stopping twice is harmless


# --------------------------------------------------------------------------- generations


async def test_generation_bump_and_read_all(db: Database) -> None:
    async with db.read() as conn:
        assert await generations.read_all(conn) == {}

    async with db.transaction() as conn:
        await generations.bump(conn, "keys")
    async with db.transaction() as conn:
        await generations.bump(conn, "keys")
        await generations.bump(conn, "clients")
        await generations.bump(conn, "keys")

    assert await committed(db) == {"keys": 3, "clients": 1}


async def test_generation_bump_is_rolled_back_with_its_transaction(db: Database) -> None:
    async with db.transaction() as conn:
        await generations.bump(conn, "keys")

    async def bump_then_fail() -> None:
        async with db.transaction() as conn:
            await generations.bump(conn, "keys")
            await generations.bump(conn, "clients")
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match=r"^abort$"):
        await bump_then_fail()

    assert await committed(db) == {"keys": 1}


@pytest.mark.postgres
async def test_racing_first_bumps_on_postgresql(pg_url: str) -> None:
    """Two transactions creating the same counter at once: both count, neither fails."""
    dbs = [Database(pg_url), Database(pg_url)]
    try:

        async def bump(db: Database) -> None:
            async with db.transaction() as conn:
                await generations.bump(conn, "race")

        await asyncio.gather(*(bump(dbs[i % 2]) for i in range(10)))

        assert (await committed(dbs[0]))["race"] == 10
    finally:
        for db in dbs:
            await db.dispose()
