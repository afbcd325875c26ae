"""Whose turn it is to write an SQLite file, among the processes that share it.

SQLite lets one connection write at a time. When two worker processes' group-commit writers both
want the file, the loser waits in SQLite's busy handler, which polls by sleeping (1, 2, 5, ... up to
100 ms between attempts): the lock is often free long before the loser looks again, so throughput
drops and the slowest answers take hundreds of milliseconds while the cores idle. An exclusive
``flock`` on a lock file next to the database is a queue the kernel keeps instead: the next waiter
is woken the moment the holder lets go. The writers take it around each batch's transaction, and
the ledger's sequencer around its write transaction; everything else that writes (the CLI, the
occasional administrative change) still meets them in SQLite's own lock,
so the file stays correct with or without this: the turn decides who goes first, not what is safe.

PostgreSQL needs none of this (row locks, many writers), so the turn is only made for a SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from trustplane.storage.db import Database, sqlite_path


class WriterTurn:
    """An exclusive ``flock`` on ``<database>.writer-lock``, taken without blocking the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @classmethod
    def for_database(cls, db: Database) -> WriterTurn | None:
        path = sqlite_path(db.url)
        return None if path is None else cls(path.with_name(path.name + ".writer-lock"))

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        fd = self._descriptor()
        try:  # the common case, nobody else writing: no thread hop
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting = asyncio.ensure_future(asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX))
            try:
                await asyncio.shield(waiting)
            except asyncio.CancelledError:  # the thread will still get the lock: give it back
                with contextlib.suppress(OSError):
                    await waiting
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The same turn, for a thread that may block (the writer's SQLite thread: ``sqlite_batch``)."""
        fd = self._descriptor()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
