"""The ``trustplane`` command run as an operator runs it: a subprocess with only the environment a
test gives it, in a working directory the test chooses."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trustplane.cli import app

TRUSTPLANE = str(Path(sys.executable).parent / "trustplane")


def run(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
    environment.update(COLUMNS="60", TRUSTPLANE_LOG_LEVEL="warning", **env)  # narrow: no wrapping
    return subprocess.run(
        [TRUSTPLANE, *args],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def invoke(cwd: Path, *args: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> Outcome:
    """The same in process (Typer's runner): much faster than a subprocess, same exit and streams.
    An exception the CLI did not turn into an exit is re-raised, so a traceback fails the test."""
    for name in list(os.environ):
        if name.startswith("TRUSTPLANE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, list(args), env={"TRUSTPLANE_LOG_LEVEL": "warning", **env})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def one_line(result: subprocess.CompletedProcess[str] | Outcome) -> str:
    """The single stderr line of a refused command (exit 2, no traceback, nothing on stdout)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))
