#!/usr/bin/env python3
"""Start-up cost of the ``trustplane`` command: CPU seconds (user + system of the child) and wall
seconds, the median of ``--runs`` runs each, for

- ``trustplane --help``
- ``trustplane keys list`` and ``trustplane clients list --json`` on an embedded (SQLite) deployment
- ``trustplane audit verify`` of a small export (a few entries and its checkpoint)
- ``trustplane serve``: from the launch to the first 200 from ``/healthz`` (polled every 20 ms)

The deployment is made once in a temporary directory (``migrate``, one client (``keygen``, ``add``), ``audit integrate``,
``audit export``) and thrown away at the end. Whether the project's own modules have byte code
(``__pycache__`` under ``src/trustplane``) and ``PYTHONDONTWRITEBYTECODE`` are printed first: with
that variable set and no byte code, every start compiles the modules again (see .ci/run).

  python bench/startup.py              # 5 runs each
  python bench/startup.py --runs 3
  python bench/startup.py --src /tmp/before/src   # another commit's sources, same machine and load

Numbers from a shared, loaded 2-vCPU machine are indicative only; CPU seconds vary less than wall.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from _common import free_port

SRC = Path(__file__).resolve().parents[1] / "src"
TRUSTPLANE = str(Path(sys.executable).parent / "trustplane")
LEI = "5493001KJTIIGC8Y1R12"  # a valid ISO 17442 LEI
API = "https://execution.example/api"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _environment(data_dir: Path, src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
    env.update(
        PYTHONPATH=str(src),
        TRUSTPLANE_DATA_DIR=str(data_dir),
        TRUSTPLANE_LOG_LEVEL="warning",
    )
    return env


def _command(env: dict[str, str], *args: str) -> Callable[[], None]:
    def run() -> None:
        subprocess.run([TRUSTPLANE, *args], env=env, check=True, capture_output=True)

    return run


def _serve(env: dict[str, str]) -> Callable[[], None]:
    def run() -> None:
        port, ops = free_port(), free_port()
        url = f"http://127.0.0.1:{ops}/healthz"
        proc = subprocess.Popen(
            [TRUSTPLANE, "serve", "--port", str(port)],
            env={**env, "TRUSTPLANE_OPS_PORT": str(ops)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=1) as response:
                        if response.status == 200:
                            return
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"serve did not answer on {url} (exit {proc.returncode})")
                time.sleep(0.02)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    return run


def measure(run: Callable[[], None], runs: int) -> tuple[float, float]:
    """Median CPU and wall seconds of ``run`` (the children's CPU: a terminated server's counts too,
    as it is waited for)."""
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(runs):
        cpu0, wall0 = _children_cpu(), time.perf_counter()
        run()
        wall.append(time.perf_counter() - wall0)
        cpu.append(_children_cpu() - cpu0)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--src",
        type=Path,
        default=SRC,
        help="The sources to measure (default: this checkout's src; e.g. an older commit's, "
        "`git archive COMMIT src | tar -x -C DIR`, for a before/after in the same conditions).",
    )
    args = parser.parse_args()
    print(f"sources: {args.src}")
    bytecode = any((args.src / "trustplane").glob("__pycache__/*.pyc"))
    print(f"byte code under src/trustplane: {'yes' if bytecode else 'no'}")
    print(f"PYTHONDONTWRITEBYTECODE: {os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="trustplane-startup-") as tmp:
        data_dir = Path(tmp) / "data"
        env = _environment(data_dir, args.src)
        setup = _command(env, "migrate")
        setup()
        _command(env, "clients", "keygen", "--out", tmp)()
        jwks = str(Path(tmp) / "jwks.json")
        add = ["clients", "add", "--lei", LEI, "--scope", "order:create", "--resource", API]
        _command(env, *add, "--jwks-file", jwks)()
        _command(env, "audit", "integrate")()
        export, note, key = Path(tmp) / "audit.jsonl", Path(tmp) / "checkpoint", Path(tmp) / "key"
        _command(env, "audit", "export", "--out", str(export), "--checkpoint-out", str(note))()
        key.write_text(
            subprocess.run(
                [TRUSTPLANE, "audit", "public-key"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        cases: list[tuple[str, Callable[[], None]]] = [
            ("trustplane --help", _command(env, "--help")),
            ("trustplane keys list", _command(env, "keys", "list")),
            ("trustplane clients list --json", _command(env, "clients", "list", "--json")),
            (
                "trustplane audit verify (small export)",
                _command(
                    env,
                    "audit",
                    "verify",
                    str(export),
                    "--checkpoint",
                    str(note),
                    "--public-key",
                    str(key),
                    "--workers",
                    "1",
                ),
            ),
            ("trustplane serve -> /healthz 200", _serve(env)),
        ]
        print(f"{'command':42} {'CPU s':>7} {'wall s':>7}   (median of {args.runs})")
        for name, run in cases:
            cpu, wall = measure(run, args.runs)
            print(f"{name:42} {cpu:7.2f} {wall:7.2f}")


if __name__ == "__main__":
    main()
