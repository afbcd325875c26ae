"""``trustplane serve --workers N``: the supervisor process, and what ties each worker to it.

uvicorn's multiprocess supervisor spawns the workers (``multiprocessing`` spawn: a fresh
interpreter each), pings each one every half second and replaces a worker that died or stopped
answering. Two gaps left workers running with nobody to stop them, still listening on the port and
holding the database:

* a stop signal (SIGTERM, SIGINT) is queued for the supervisor's loop, and a round of pings waits
  for each worker's answer for up to ``timeout_worker_healthcheck`` (60 s here, see
  :mod:`trustplane.server`). A replacement worker answers only once it has imported everything, so
  while one was starting on a loaded host the supervisor held the signal for up to a minute, and
  whatever ended it meanwhile (a service manager's or a test's SIGKILL after its own timeout) left
  every worker behind. Its final wait for the workers had no bound either;
* nothing ended the workers when the supervisor itself was gone (SIGKILL, the OOM killer): they
  were re-parented to init and kept serving.

:class:`Supervisor` waits for an answer in short slices and stops waiting as soon as a stop signal
is queued or the worker has died, starts no replacement once a stop signal is queued, and at the end
gives every child process it started, listed or not, :data:`STOP_GRACE` seconds in all to finish
its graceful stop before killing it.

:func:`follow_supervisor` runs first in every spawned worker. On Linux it asks the kernel to send
the worker :data:`SUPERVISOR_GONE` when the supervisor dies (``prctl(PR_SET_PDEATHSIG)``), then
checks ``getppid()``, since the supervisor may have died before the request was made (no signal
would come). A worker whose supervisor is gone logs ``worker_supervisor_gone`` and stops as on
SIGTERM (requests in flight are answered); if that stop hangs, SIGALRM's default action ends it
:data:`STOP_GRACE` seconds later. The kernel's signal rather than a watch in the worker: it comes
however the supervisor ended, at that moment, with nothing polled (an idle worker is not woken) and
no thread of the worker that has to be scheduled to notice; a watch is either a ``getppid()`` poll
or a thread blocked on the parent's pipe per worker. Its one condition: the signal follows the
thread that spawned the worker, and uvicorn's supervisor spawns from its main thread, which lives
as long as the process. Elsewhere (no ``prctl``) following is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from trustplane import metrics
from trustplane.logging import configure_logging
from trustplane.settings import Settings

#: Seconds a worker has to finish its graceful stop (requests in flight, the longest a 30 s long
#: poll of ``GET /events``) before it is killed: by the supervisor after its stop, by the worker's
#: own alarm once its supervisor is gone.
STOP_GRACE = 30
#: What the kernel sends a worker when its supervisor dies (Linux). Not SIGTERM: uvicorn's handler
#: takes that one, and the worker could not tell its supervisor's death from an operator's stop.
SUPERVISOR_GONE = getattr(signal, "SIGUSR2", None)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: How long the supervisor waits for a worker's answer before it looks at its signals again.
_SLICE = 0.2
_STOP_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name)
)

logger = logging.getLogger("uvicorn.error")  # the supervisor's lines go with uvicorn's own
log = structlog.get_logger("trustplane.supervisor")


# --------------------------------------------------------------------------- the supervisor


def supervise(config: uvicorn.Config, sockets: list[socket.socket], settings: Settings) -> None:
    """Run the workers until SIGINT/SIGTERM, the multiprocess metrics directory set up around
    them (:mod:`trustplane.metrics`)."""
    path, owned = metrics.prepare_multiprocess(settings.data_dir)
    try:
        Supervisor(config, sockets, path).run()
    finally:
        metrics.finish_multiprocess(path, owned)


class Supervisor(Multiprocess):
    """uvicorn's supervisor, stopping promptly and completely; every worker it replaced (died, or
    SIGHUP restart) is marked dead for the live gauges."""

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], metrics_dir: Path
    ) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir

    def keep_subprocess_alive(self) -> None:
        """uvicorn's round: a worker that does not answer is killed and replaced, unless it failed
        before it started serving (the run stops: it would fail the same way again)."""
        for idx, process in enumerate(self.processes):
            if self._stopping():
                return
            if self._answers(process):
                continue
            process.kill()
            process.join()
            self._mark_gone({process.pid})
            if process.exitcode == STARTUP_FAILURE:
                logger.error(f"Child process [{process.pid}] failed to start, stopping.")
                self.should_exit.set()
                return
            if self._stopping():
                return
            logger.info(f"Child process [{process.pid}] died")
            replacement = Process(self.config, self.sockets)
            replacement.start()
            self.processes[idx] = replacement

    def restart_all(self) -> None:
        before = {p.pid for p in self.processes}
        super().restart_all()
        self._mark_gone(before - {p.pid for p in self.processes})

    def join_all(self) -> None:
        """After ``terminate_all`` (SIGTERM to the listed workers): every child this process
        started, listed or not, has :data:`STOP_GRACE` seconds in all, then is killed."""
        listed = {p.pid for p in self.processes}
        children = multiprocessing.active_children()
        for child in children:
            if child.pid not in listed:
                child.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for child in children:
            child.join(max(0.0, deadline - time.monotonic()))
        for child in children:
            if child.exitcode is None:
                logger.warning(f"Child process [{child.pid}] still running after {STOP_GRACE} s")
                child.kill()
                child.join()

    def _answers(self, process: Process) -> bool:
        """uvicorn's health check (one ping, answered within ``timeout_worker_healthcheck``), waited
        for in slices: False as soon as the worker has died, True once a stop signal is queued
        (the stop ends the worker either way)."""
        if not process.process.is_alive():
            return False
        deadline = time.monotonic() + self.config.timeout_worker_healthcheck
        try:
            process.parent_conn.send(b"ping")
            while not process.parent_conn.poll(_SLICE):
                if not process.process.is_alive() or time.monotonic() > deadline:
                    return False
                if self._stopping():
                    return True
            process.parent_conn.recv()
        except (OSError, EOFError, pickle.UnpicklingError):
            return False
        return True

    def _stopping(self) -> bool:
        """A stop signal has arrived, whether the loop has handled it yet or not."""
        return self.should_exit.is_set() or any(s in _STOP_SIGNALS for s in self.signal_queue)

    def _mark_gone(self, pids: set[int | None]) -> None:
        for pid in pids:
            if pid is not None:
                metrics.worker_exited(pid, self.metrics_dir)


# --------------------------------------------------------------------------- the workers


def follow_supervisor(settings: Settings) -> None:
    """In a worker spawned by the supervisor (``multiprocessing.parent_process()``), first thing:
    end with the supervisor. A no-op in a process nobody spawned, or without ``prctl``."""
    parent = multiprocessing.parent_process()
    prctl = _prctl()
    if parent is None or parent.pid is None or prctl is None or SUPERVISOR_GONE is None:
        return
    supervisor = parent.pid
    try:
        loop = asyncio.get_running_loop()  # uvicorn calls the app factory on its loop
        loop.add_signal_handler(SUPERVISOR_GONE, _supervisor_gone, supervisor)
    except (RuntimeError, ValueError, NotImplementedError):
        return  # not uvicorn's worker: no loop of ours to stop
    if prctl(_PR_SET_PDEATHSIG, int(SUPERVISOR_GONE)) != 0:
        return
    if os.getppid() != supervisor:  # gone before the kernel was asked: no signal will come
        configure_logging(settings.log_level, settings.log_format)
        log.warning("worker_supervisor_gone", supervisor=supervisor, noticed="at start")
        sys.exit(0)


def _supervisor_gone(supervisor: int) -> None:
    """The kernel's signal (run by the event loop, not inside a signal handler, so logging is
    safe): stop as on SIGTERM, and be ended if that stop takes longer than :data:`STOP_GRACE`."""
    if os.getppid() == supervisor:
        return  # someone else sent it: the supervisor is alive
    log.warning(
        "worker_supervisor_gone", supervisor=supervisor, noticed="signal", stop_grace=STOP_GRACE
    )
    signal.alarm(STOP_GRACE)  # SIGALRM's default action ends the process
    signal.raise_signal(signal.SIGTERM)  # uvicorn's graceful stop


def _prctl() -> Callable[..., int] | None:
    """The C library's ``prctl``, on Linux only."""
    if sys.platform != "linux":
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl
