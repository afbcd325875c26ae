"""``trustplane demo``: the reference lifecycle on one machine, from a fresh checkout.

Three deployments (the arranger, the broker, the clearing broker), each a ``trustplane serve`` on the
embedded default with its own data directory, federated by trust profiles with SSF; the reference
services (``trustplane reference serve``) of the broker and the clearing; then BRIEF.md's steps 1-6,
step 5's exception included; the chain of authority as a tree; each ledger exported and verified
offline; everything it started stopped. :func:`run_demo` is the entry point (the CLI's and the
test's); :mod:`.processes`, :mod:`.parties`, :mod:`.lifecycle` and :mod:`.ledgers` are its parts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console

from trustplane.demo.lifecycle import Options, Run, run
from trustplane.demo.processes import DemoFailed, Processes

DEFAULT_NATS = "nats://127.0.0.1:4222"


def nats_reachable(url: str, timeout: float = 0.5) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout):
            return True
    except OSError:
        return False


def choose_nats(mode: str) -> str | None:
    """``auto``: NATS if reachable (``NATS_URL`` or the default), else the embedded outbox."""
    url = os.environ.get("NATS_URL", DEFAULT_NATS)
    if mode == "off":
        return None
    if nats_reachable(url):
        return url
    if mode == "on":
        raise DemoFailed(f"--nats on: NATS is not reachable at {url}")
    return None


@contextlib.contextmanager
def workspace(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="trustplane-demo-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_demo(workdir: Path | None, log_level: str, nats: str, console: Console) -> dict[str, Any]:
    """Run the demo; the summary (``ok`` False and ``error`` on a failed step). Every process it
    started is stopped before it returns, whatever happened (KeyboardInterrupt re-raised after)."""
    started = time.monotonic()
    processes = Processes()
    state = Run(console)
    summary: dict[str, Any] = {"ok": False, "steps": state.steps}
    with workspace(workdir) as where:
        summary["workdir"] = str(where) if workdir is not None else None
        try:
            nats_url = choose_nats(nats)
            summary["nats"] = nats_url
            run(Options(where, log_level, nats_url), state, processes)
            summary["ok"] = True
        except DemoFailed as exc:
            summary["error"] = str(exc)
            for process in processes.started:
                summary.setdefault("logs", {})[process.name] = process.tail(1500)
        finally:
            summary.update(state.facts)
            t0 = time.monotonic()
            processes.stop_all()
            ports = [_port(p.argv) for p in processes.started]
            summary["ports"] = [p for p in ports if p is not None]
            summary["stopped"] = {
                "processes": len(processes.started),
                "all_exited": not any(p.running() for p in processes.started),
                "seconds": round(time.monotonic() - t0, 2),
            }
            summary["seconds"] = round(time.monotonic() - started, 2)
    return summary


def _port(argv: list[str]) -> int | None:
    return int(argv[argv.index("--port") + 1]) if "--port" in argv else None
