"""``trustplane serve --workers 2`` leaves no process behind (``trustplane.supervisor``): the workers
end when their supervisor is killed (one still starting as well), a stop while a worker is being
replaced ends every worker at once, a worker that dies while the supervisor waits for its answer is replaced at once, and the
live-server teardown ends a server that does not stop by itself. Real processes; every wait polls
with a bound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.e2e.conftest as live
from tests.conftest import wait_until
from tests.e2e.conftest import LiveServer, LiveServers, processes_of, running_servers

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc: Linux"),
]
#: A generous bound for processes to go: a stop takes well under a second on an idle machine.
GONE_TIMEOUT = 20.0
#: Three of the supervisor's rounds (one every 0.5 s): long enough for its next round to be waiting
#: for a worker that cannot answer. A pause that sets up a state, not a wait for a result.
ROUNDS = 1.5


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LiveServers]:
    with running_servers(tmp_path) as running:
        yield running


def _data_dir(server: LiveServer) -> str:
    return server.env["TRUSTPLANE_DATA_DIR"]


def _workers(server: LiveServer) -> set[int]:
    """The server's worker processes (multiprocessing spawn children), not its resource tracker."""
    return {pid for pid, cmd in processes_of(_data_dir(server)).items() if "spawn_main" in cmd}


def _two_workers(servers: LiveServers) -> tuple[LiveServer, set[int]]:
    server = servers.start(workers="2")
    workers = wait_until(lambda: len(_workers(server)) == 2 and _workers(server), 30, "2 workers")
    return server, workers


def _replacement(server: LiveServer, workers: set[int]) -> int:
    """The worker the supervisor spawns in place of a killed one (polled closely: it is caught
    while it still imports)."""
    new: int = wait_until(
        lambda: next(iter(_workers(server) - workers), 0), 30, "the replacement", step=0.005
    )
    return new


def test_killing_the_supervisor_ends_every_worker(servers: LiveServers) -> None:
    server, _ = _two_workers(servers)
    assert server.process is not None
    server.process.kill()  # as the OOM killer would: the supervisor runs nothing more
    server.process.wait()
    wait_until(lambda: not processes_of(_data_dir(server)), GONE_TIMEOUT, "every worker to end")
    assert server.log().count('"event": "worker_supervisor_gone"') == 2, server.log()


def test_a_worker_still_starting_when_the_supervisor_dies_ends_too(servers: LiveServers) -> None:
    server, workers = _two_workers(servers)
    assert server.process is not None
    os.kill(min(workers), signal.SIGKILL)
    replacement = _replacement(server, workers)
    os.kill(replacement, signal.SIGSTOP)  # still importing: it has not asked the kernel yet
    # a member of the server's process group whose parent (this test) is outside it: without it,
    # the supervisor's death orphans the group, and the kernel ends its stopped member with SIGHUP
    # (POSIX job control) before the replacement can find out by itself
    with subprocess.Popen(["sleep", "60"], process_group=server.process.pid) as anchor:
        try:
            server.process.kill()
            server.process.wait()
            os.kill(replacement, signal.SIGCONT)  # it finds its supervisor gone (getppid), ends
            wait_until(
                lambda: not processes_of(_data_dir(server)), GONE_TIMEOUT, "every worker to end"
            )
        finally:
            anchor.kill()
    assert server.log().count('"noticed": "at start"') == 1, server.log()
    assert server.log().count('"noticed": "signal"') == 1, server.log()


def test_a_stop_while_a_worker_is_replaced_ends_every_worker(servers: LiveServers) -> None:
    server, workers = _two_workers(servers)
    assert server.process is not None
    victim, survivor = sorted(workers)
    os.kill(victim, signal.SIGKILL)
    replacement = _replacement(server, workers)
    # a replacement still importing on a loaded host: it answers no health ping yet, and the
    # supervisor's round is waiting for its answer when the stop comes
    os.kill(replacement, signal.SIGSTOP)
    try:
        time.sleep(ROUNDS)
        server.process.terminate()
        # before: the supervisor held the SIGTERM until the replacement answered its ping (up to
        # timeout_worker_healthcheck, 60 s); a teardown that gave up first left every worker
        wait_until(
            lambda: survivor not in processes_of(_data_dir(server)),
            GONE_TIMEOUT,
            "the other worker to stop while the replacement is still starting",
        )
    finally:
        os.kill(replacement, signal.SIGCONT)
    wait_until(lambda: server.process.poll() is not None, GONE_TIMEOUT, "the supervisor to exit")
    assert server.process.returncode == 0, server.log()
    wait_until(lambda: not processes_of(_data_dir(server)), GONE_TIMEOUT, "every process to end")


def test_a_worker_that_dies_unanswered_is_replaced_at_once(servers: LiveServers) -> None:
    server, workers = _two_workers(servers)
    victim = min(workers)
    os.kill(victim, signal.SIGSTOP)  # the supervisor's next round waits for its answer
    time.sleep(ROUNDS)
    os.kill(victim, signal.SIGKILL)
    # before: the supervisor waited for the dead worker's answer for the whole health check
    # timeout (60 s): it holds both ends of the worker's pipe, so no end-of-file came
    new = _replacement(server, workers)
    assert new not in workers
    server.wait_ready(time.monotonic() + 30)


def test_the_teardown_ends_a_server_that_does_not_stop(
    servers: LiveServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "STOP_TIMEOUT", 1.0)
    server, _ = _two_workers(servers)
    members = processes_of(_data_dir(server))
    for pid in members:  # hung: nothing but SIGKILL is acted on, not even the kernel's signal
        os.kill(pid, signal.SIGSTOP)
    server.stop()
    assert not processes_of(_data_dir(server))
    assert server.leftovers == []  # the group was killed: nothing was found left afterwards
