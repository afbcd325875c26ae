"""Tests run by several pytest-xdist workers at once (``make test``: ``pytest -n 2``), and the few that
must run while no other test runs.

Every test is isolated from the others by its names: each worker has its own PostgreSQL database
(``pg_database`` is per process), NATS streams and subjects carry a random prefix, Redis keys a random
issuer, ports come from ``free_port()`` and files live under ``tmp_path``. What names cannot isolate is
the machine itself: a test marked ``serial`` measures something the other worker would disturb (a port
that must be free after a stop, a deadline on a loaded machine). It runs with the machine's test load
to itself: the other workers finish the test they are in and wait until it is done.

The turn is two ``flock`` files in the run's temporary directory, shared by the workers:

- every other test: ``gate`` exclusive, ``tests`` shared, ``gate`` released; ``tests`` released at
  the end of its teardown. Tests of different workers hold ``tests`` together.
- a ``serial`` test: ``gate`` exclusive (no test starts behind it), then ``tests`` exclusive (the
  running ones have finished), both held through its setup, call and teardown.

Without xdist (a plain ``pytest`` run, one process) nothing is locked: the tests run one at a time
anyway. A worker that dies releases its locks with its file descriptors.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

SERIAL = "serial"


class Turns:
    """The two lock files of one test run, opened once per worker."""

    def __init__(self, directory: Path) -> None:
        self._gate = os.open(directory / "serial-gate.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._tests = os.open(directory / "serial-tests.lock", os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def alongside_others(self) -> Iterator[None]:
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._tests, fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._tests, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._tests, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._tests, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._gate)
        os.close(self._tests)


_turns: Turns | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _turns
    if os.environ.get("PYTEST_XDIST_WORKER") and config.option.basetemp:
        # a worker's basetemp is <the run's basetemp>/<worker id>: the parent is shared by the run
        _turns = Turns(Path(config.option.basetemp).parent)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _turns
    if _turns is not None:
        _turns.close()
        _turns = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Setup, call and teardown of ``item`` inside its turn (module-scoped fixtures that the test
    starts or finishes included)."""
    if _turns is None:
        return (yield)
    turn = _turns.alone() if item.get_closest_marker(SERIAL) else _turns.alongside_others()
    with turn:
        return (yield)
