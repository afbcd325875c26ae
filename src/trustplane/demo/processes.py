"""The processes the demo starts: three ``trustplane serve`` deployments and the reference services
(``trustplane reference serve``), each in its own process group on a loopback port, each with its
own data directory; all stopped by :meth:`Processes.stop_all`, also after a failure or Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TRUSTPLANE = shutil.which("trustplane") or str(Path(sys.executable).with_name("trustplane"))


class DemoFailed(Exception):
    """A step's outcome was not the expected one (the message says which)."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailed(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """Our environment without any TRUSTPLANE_* setting leaking into the children."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}


@dataclass
class Process:
    """One child process in its own session (process group), its output in ``log``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, pipes: bool = False) -> None:
        """``pipes``: stdin and stdout are pipes to us (the log gets stderr only)."""
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, start_new_session=True,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out,
                stderr=out if pipes else subprocess.STDOUT,
            )  # fmt: skip

    def ask(self, line: str) -> str:
        """Write one line to the process, read one line back."""
        assert self.popen is not None
        assert self.popen.stdin is not None
        assert self.popen.stdout is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()
        answer = self.popen.stdout.readline()
        if not answer:
            raise DemoFailed(f"{self.name} exited:\n{self.tail()}")
        return answer.decode()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def terminate(self) -> None:
        """SIGTERM to the whole group (the server and any worker it forked)."""
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)

    def reap(self, timeout: float) -> None:
        """Wait for the exit; SIGKILL the group after ``timeout`` and for any straggler."""
        if self.popen is None:
            return
        try:
            self.popen.wait(max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def tail(self, size: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""


def wait_http(process: Process, url: str, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200 (or the process dies, or ``timeout``)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0) as http:
        while time.monotonic() < deadline:
            if not process.running():
                raise DemoFailed(f"{process.name} exited early:\n{process.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if http.get(url).status_code == 200:
                    return
            time.sleep(0.05)
    raise DemoFailed(f"{process.name} not ready within {timeout:g} s")


@dataclass
class Deployment:
    """One organisation's ``trustplane serve`` on the embedded default (SQLite, keys made on first
    start) with the loopback development settings the federation and SSF need on one machine."""

    name: str
    workdir: Path
    vocabulary: dict[str, str]
    log_level: str = "warning"
    port: int = field(default_factory=free_port)
    process: Process | None = None
    operator: Process | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / self.name

    @property
    def env(self) -> dict[str, str]:
        env = clean_env()
        env.update(
            TRUSTPLANE_DATA_DIR=str(self.data_dir),
            TRUSTPLANE_DATABASE_URL=f"sqlite+aiosqlite:///{self.data_dir / 'trustplane.db'}",
            TRUSTPLANE_PORT=str(self.port),
            TRUSTPLANE_ISSUER=self.issuer,
            TRUSTPLANE_OPS_PORT="0",  # three servers on one host: no operations listener
            TRUSTPLANE_SCOPES_FILE=str(self.data_dir / "scopes.toml"),
            TRUSTPLANE_CACHE_REFRESH_INTERVAL="0.2",
            TRUSTPLANE_FEDERATION_ALLOW_INSECURE_LOOPBACK="true",  # partners on http://127.0.0.1
            TRUSTPLANE_SSF_ALLOW_INSECURE_LOOPBACK="true",  # SSF push to loopback receivers
            TRUSTPLANE_ALLOW_INSECURE_LOOPBACK_JWKS_URI="true",  # partners' subscription clients
            TRUSTPLANE_SSF_SUBSCRIBE_INTERVAL="0.5",
            TRUSTPLANE_LOG_LEVEL=self.log_level,
        )
        return env

    def start(self) -> Process:
        if self.data_dir.exists():
            raise DemoFailed(f"{self.data_dir} already exists: give an empty --workdir")
        self.data_dir.mkdir(parents=True)
        (self.data_dir / "scopes.toml").write_text(scopes_toml(self.vocabulary))
        argv = [TRUSTPLANE, "serve", "--port", str(self.port), "--workers", "1"]
        self.process = Process(
            self.name, argv, self.env, self.data_dir / "server.log", self.data_dir
        )
        self.process.start()
        operator = [sys.executable, "-m", "trustplane.demo.operator"]
        log = self.data_dir / "operator.log"
        self.operator = Process(f"{self.name} operator", operator, self.env, log, self.data_dir)
        self.operator.start(pipes=True)
        return self.process

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_http(self.process, f"{self.issuer}/healthz")

    def operate(self, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The operator's actions (:mod:`trustplane.demo.operator`) against this deployment's
        database; their results, in order."""
        assert self.operator is not None
        answer = json.loads(self.operator.ask(json.dumps(actions)))
        if "error" in answer:
            raise DemoFailed(f"{self.name}: operator: {answer['error']}")
        return list(answer["results"])


def scopes_toml(vocabulary: dict[str, str]) -> str:
    """A scope vocabulary file: each resource (audience) and the scopes it accepts."""
    lines: list[str] = []
    by_scope: dict[str, list[str]] = {}
    for resource, scopes in vocabulary.items():
        lines += [f'[resources."{resource}"]', f'description = "{resource}"', ""]
        for scope in scopes.split():
            by_scope.setdefault(scope, []).append(resource)
    for scope, resources in by_scope.items():
        lines += [f'[scopes."{scope}"]', f'description = "{scope}"']
        lines += ["resources = [" + ", ".join(f'"{r}"' for r in resources) + "]", ""]
    return "\n".join(lines)


@dataclass
class ReferenceService:
    """``trustplane reference serve`` for one party: its audience, the issuers it trusts, its PDP,
    the issuer it asks about mandates, over the services' stores in ``store_dir`` (one file each)."""

    name: str
    store_dir: Path
    settings: dict[str, str]
    log_level: str = "warning"
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Process:
        env = clean_env()
        env.update({f"TRUSTPLANE_REFERENCE_{k.upper()}": v for k, v in self.settings.items()})
        argv = [TRUSTPLANE, "reference", "serve", "--port", str(self.port)]
        argv += ["--log-level", self.log_level]
        log = self.store_dir / f"{self.name}.log"
        self.process = Process(self.name, argv, env, log, self.store_dir)
        self.process.start()
        return self.process

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_http(self.process, f"{self.url}/jwks")


@dataclass
class Processes:
    """Everything started, in order; stopped in reverse."""

    started: list[Process] = field(default_factory=list)

    def add(self, process: Process) -> None:
        self.started.append(process)

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM to every group at once, then reap each (SIGKILL past ``timeout``)."""
        for process in reversed(self.started):
            process.terminate()
        deadline = time.monotonic() + timeout
        for process in reversed(self.started):
            process.reap(deadline - time.monotonic())
