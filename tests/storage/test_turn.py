"""The SQLite writers' turn (``storage/turn.py``): an exclusive, kernel-queued lock between the
processes that write one file, taken without blocking the event loop and never leaked."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

from trustplane.storage.db import Database
from trustplane.storage.turn import WriterTurn


def test_only_a_sqlite_file_has_a_turn(tmp_path: Path) -> None:
    turn = WriterTurn.for_database(Database(f"sqlite:///{tmp_path / 'tp.db'}"))
    assert turn is not None
    assert turn.path == tmp_path / "tp.db.writer-lock"
    assert WriterTurn.for_database(Database("sqlite://")) is None
    assert WriterTurn.for_database(Database("postgresql://postgres@127.0.0.1/test")) is None


@pytest.mark.asyncio
async def test_the_second_writer_waits_for_the_first(tmp_path: Path) -> None:
    first, second = WriterTurn(tmp_path / "lock"), WriterTurn(tmp_path / "lock")
    order: list[str] = []
    released, entered = asyncio.Event(), asyncio.Event()

    async def hold_first() -> None:
        async with first.hold():
            order.append("first in")
            entered.set()
            await released.wait()
            order.append("first out")

    async def hold_second() -> None:
        async with second.hold():
            order.append("second in")

    task_first = asyncio.create_task(hold_first())
    await entered.wait()
    task_second = asyncio.create_task(hold_second())
    for _ in range(50):  # the event loop keeps running while the second waits in its thread
        await asyncio.sleep(0.001)
    released.set()
    await asyncio.gather(task_first, task_second)

    assert order == ["first in", "first out", "second in"]
    first.close(), second.close()


@pytest.mark.asyncio
async def test_a_cancelled_waiter_does_not_keep_the_lock(tmp_path: Path) -> None:
    """Cancelled while waiting (the writer being stopped), the waiter's thread still gets the lock
    once the holder lets go, and gives it straight back."""
    holder, waiter, later = (WriterTurn(tmp_path / "lock") for _ in range(3))
    context = holder.hold()
    await context.__aenter__()
    waiting = asyncio.create_task(waiter.hold().__aenter__())
    await asyncio.sleep(0.05)
    waiting.cancel()
    await context.__aexit__(None, None, None)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    async with asyncio.timeout(10), later.hold():  # would hang if the cancelled waiter kept it
        pass
    for turn in (holder, waiter, later):
        turn.close()


def _hold_in_child(path: str, entered: object, leave: object) -> None:
    async def run() -> None:
        async with WriterTurn(Path(path)).hold():
            entered.set()  # type: ignore[attr-defined]
            leave.wait(30)  # type: ignore[attr-defined]

    asyncio.run(run())


@pytest.mark.asyncio
async def test_processes_take_turns(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    entered, leave = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_in_child, args=(str(tmp_path / "lock"), entered, leave))
    child.start()
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        mine = WriterTurn(tmp_path / "lock")
        got = asyncio.create_task(mine.hold().__aenter__())
        await asyncio.sleep(0.05)
        assert not got.done()  # the child holds the turn
        leave.set()
        async with asyncio.timeout(30):
            await got
        mine.close()
    finally:
        leave.set()
        child.join(30)
