"""Real ``trustplane serve`` processes on loopback, and the CLI run against the same settings.

``live_server`` is a factory: ``live_server.start(db_url)`` runs one server with its own data directory;
``live_server.start_cluster(2, pg_url)`` runs several that share one database, one KEK and one issuer
(as behind a load balancer). Every server is stopped when the test ends (SIGTERM, then SIGKILL to its
whole process group: the supervisor and every worker), and a server whose log shows a traceback, or
that left a process behind, fails the test. Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.authorize.flow import REDIRECT_URI
from tests.conftest import (
    CLEARING,
    EXECUTION,
    KEK,
    LEI,
    ClientKit,
    free_port,
    jwks_for,
    new_ec_key,
    run_sync,
    truncate_all,
    wait_until,
)

TRUSTPLANE = str(Path(sys.executable).with_name("trustplane"))
START_TIMEOUT = 45.0
STOP_TIMEOUT = 10.0
#: How long a stopped server's processes (workers, multiprocessing's resource tracker) may take to go.
LEFTOVER_TIMEOUT = 5.0
CLI_TIMEOUT = 60.0
#: How often the servers poll for keys and clients changed by another process (the CLI).
REFRESH_INTERVAL = 0.2
#: Upper bound for "a running server notices a change": many refresh intervals, never a tight limit.
PROPAGATION_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def settings_env(database_url: str, data_dir: Path, **settings: str) -> dict[str, str]:
    """The process environment: ours minus any TRUSTPLANE_* leaking in, plus these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
    env.update(
        TRUSTPLANE_DATABASE_URL=database_url,
        TRUSTPLANE_DATA_DIR=str(data_dir),
        TRUSTPLANE_KEY_ENCRYPTION_KEY=KEK,
        TRUSTPLANE_CACHE_REFRESH_INTERVAL=str(REFRESH_INTERVAL),
        TRUSTPLANE_LOG_LEVEL="warning",
        TRUSTPLANE_OPS_PORT=str(free_port()),  # several servers per test: never the fixed default
    )
    env.update({f"TRUSTPLANE_{name.upper()}": value for name, value in settings.items()})
    return env


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, have the kernel SIGTERM the server if the test process
    dies without running its teardown (SIGKILL, crash), so no server outlives the test run."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def processes_of(data_dir: str) -> dict[int, str]:
    """The live processes (pid -> command line) whose environment names ``data_dir`` as
    ``TRUSTPLANE_DATA_DIR``: a server's supervisor, its workers and their helpers, re-parented or
    not. Linux only (``/proc``); empty elsewhere."""
    marker = f"\0TRUSTPLANE_DATA_DIR={data_dir}\0".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z" or marker not in (
                b"\0" + (entry / "environ").read_bytes()
            ):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        found[int(entry.name)] = command[:160]
    return found


def run_cli(env: dict[str, str], *args: str) -> str:
    """Run ``trustplane ARGS`` with ``env``; return stdout, fail the test on a non-zero exit."""
    proc = subprocess.run(
        [TRUSTPLANE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"`trustplane {' '.join(args)}` exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


@dataclass
class LiveServer:
    """One running ``trustplane serve``; ``env`` also drives the CLI against the same database."""

    port: int
    issuer: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    #: Processes found alive after a stop (then killed): the teardown fails naming them.
    leftovers: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        """The operations listener (/metrics, /readyz, /docs): a port of its own on loopback."""
        return f"http://127.0.0.1:{self.env['TRUSTPLANE_OPS_PORT']}"

    def cli(self, *args: str) -> str:
        return run_cli(self.env, *args)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def launch(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [TRUSTPLANE, "serve", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.env["TRUSTPLANE_DATA_DIR"],
                preexec_fn=_die_with_parent,
                process_group=0,  # its own group: the supervisor and its workers, for stop()
            )

    def wait_ready(self, deadline: float, relaunches: int = 3) -> None:
        """Poll /healthz until 200. A port taken between ``free_port()`` and the bind (another test
        session on this machine) moves the server to fresh ports, a few times at most."""
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                if relaunches > 0 and "address already in use" in self.log():
                    relaunches -= 1
                    self._move_to(free_port())
                    self.launch()
                    continue
                pytest.fail(f"server on port {self.port} exited early:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server on port {self.port} not healthy in time:\n{self.log()[-4000:]}"
                )
            time.sleep(0.05)

    def _move_to(self, port: int) -> None:
        self.port = port
        self.env["TRUSTPLANE_PORT"] = str(port)
        self.env["TRUSTPLANE_OPS_PORT"] = str(free_port())
        if "TRUSTPLANE_ISSUER" not in self.env:  # the issuer is derived from the port
            self.issuer = self.base_url

    def stop(self) -> None:
        """SIGTERM, and SIGKILL to the whole process group if the server has not exited within
        ``STOP_TIMEOUT``; then any process of the server still alive is killed and recorded in
        ``leftovers``."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)
        self._reap_leftovers()

    def _reap_leftovers(self) -> None:
        data_dir = self.env["TRUSTPLANE_DATA_DIR"]
        deadline = time.monotonic() + LEFTOVER_TIMEOUT
        while (left := processes_of(data_dir)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid, command in left.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.leftovers.append(f"pid {pid}: {command}")


@dataclass
class LiveServers:
    """The ``live_server`` fixture: starts servers and stops every one of them at teardown."""

    tmp_path: Path
    servers: list[LiveServer] = field(default_factory=list)

    def start(self, database_url: str | None = None, **settings: str) -> LiveServer:
        """One server. ``database_url`` None: a fresh SQLite file in its own data directory. The
        issuer is left to its default (http://127.0.0.1:PORT) unless ``issuer=`` is given."""
        return self.start_cluster(1, database_url, **settings)[0]

    def start_cluster(
        self, count: int, database_url: str | None = None, **settings: str
    ) -> list[LiveServer]:
        """``count`` servers sharing one database, KEK and issuer (the first one's URL)."""
        ports = [free_port() for _ in range(count)]
        if count > 1:
            settings.setdefault("issuer", f"http://127.0.0.1:{ports[0]}")
        cluster: list[LiveServer] = []
        for port in ports:
            data_dir = self.tmp_path / f"server-{port}"
            data_dir.mkdir(parents=True)
            url = database_url or f"sqlite+aiosqlite:///{data_dir / 'trustplane.db'}"
            database_url = url  # the rest of the cluster shares the first server's database
            server = LiveServer(
                port,
                settings.get("issuer", f"http://127.0.0.1:{port}"),
                # TRUSTPLANE_PORT is in the environment so that the CLI derives the same issuer
                settings_env(url, data_dir, port=str(port), **settings),
                data_dir / "server.log",
            )
            self.servers.append(server)
            server.launch()
            cluster.append(server)
        deadline = time.monotonic() + START_TIMEOUT
        for server in cluster:
            server.wait_ready(deadline)
        return cluster

    def close(self) -> list[str]:
        """Stop everything; return the logs that show a crash, and the processes left behind."""
        crashed = []
        for server in reversed(self.servers):
            server.stop()
            if "Traceback" in server.log():
                crashed.append(f"server on port {server.port}:\n{server.log()[-4000:]}")
            if server.leftovers:
                left = "\n".join(server.leftovers)
                crashed.append(f"server on port {server.port} left processes behind:\n{left}")
        return crashed


@contextlib.contextmanager
def running_servers(tmp_path: Path) -> Iterator[LiveServers]:
    """A ``LiveServers`` whose servers are all stopped on exit; fails if one logged a traceback."""
    servers = LiveServers(tmp_path)
    try:
        yield servers
    finally:
        crashed = servers.close()
    if crashed:
        pytest.fail("a live server crashed or left processes:\n" + "\n".join(crashed))


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServers]:
    """Servers for one test. Module-scoped fixtures use :func:`running_servers` directly."""
    with running_servers(tmp_path) as servers:
        yield servers


@pytest.fixture(scope="module")
def module_pg_url(pg_database: str) -> str:
    """The session's PostgreSQL database, emptied once for a module that shares its servers."""
    run_sync(truncate_all(pg_database))
    return pg_database


#: ``params`` of a module-scoped server fixture run once per database.
DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def module_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[LiveServer]:
    """Body of a module-scoped ``server`` fixture with ``params=DATABASES``: one server per database
    for the whole module (starting one costs seconds)."""
    url = request.getfixturevalue("module_pg_url") if request.param == "postgresql" else None
    with running_servers(tmp_path_factory.mktemp(name)) as servers:
        yield servers.start(url)


# --------------------------------------------------------------------------- clients


def register_client(
    *servers: LiveServer,
    scopes: tuple[str, ...] = ("order:create", "order:cancel", "settlement:submit"),
    resources: tuple[str, ...] = (EXECUTION, CLEARING),
    introspection_resources: tuple[str, ...] = (EXECUTION,),
) -> ClientKit:
    """Register a private_key_jwt client with ``trustplane clients add --json`` and wait (bounded)
    until every given server has picked it up from the database."""
    first = servers[0]
    key, kid = new_ec_key(), "e2e-key-1"
    jwks_file = Path(first.env["TRUSTPLANE_DATA_DIR"]) / f"jwks-{time.monotonic_ns()}.json"
    jwks_file.write_text(json.dumps(jwks_for(key, kid)))
    args = ["clients", "add", "--lei", LEI, "--jwks-file", str(jwks_file), "--name", "e2e client"]
    args += [arg for scope in scopes for arg in ("--scope", scope)]
    args += [arg for resource in resources for arg in ("--resource", resource)]
    args += [a for r in introspection_resources for a in ("--introspection-resource", r)]
    body = first.cli_json(*args)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kit = ClientKit(body["client_id"], key, first.issuer, kid=kid, pem=pem)
    for server in servers:
        wait_until(
            lambda server=server: knows_client(server, kit),
            PROPAGATION_TIMEOUT,
            f"server on port {server.port} to load client {kit.client_id}",
        )
    return kit


def knows_client(server: LiveServer, kit: ClientKit) -> bool:
    """True once the server authenticates ``kit``. Probes /introspect, which writes no audit event, so
    tests can still count the token endpoint's audit rows exactly."""
    response = httpx.post(
        f"{server.base_url}/introspect", data={"token": "probe", **kit.auth()}, timeout=10.0
    )
    return response.status_code == 200


# --------------------------------------------------------------------------- protocol calls


def client_credentials_token(
    server: LiveServer, kit: ClientKit, scope: str = "order:create", resource: str = EXECUTION
) -> str:
    """An access token by client credentials (private_key_jwt); fails the test unless issued."""
    response = httpx.post(
        f"{server.base_url}/token",
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "resource": resource,
            **kit.auth(),
        },
        timeout=10.0,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def redeem_code(server: LiveServer, kit: ClientKit, code: str, verifier: str) -> httpx.Response:
    """The authorization_code grant for ``code`` (redirect URI of ``tests.authorize.flow``)."""
    return httpx.post(
        f"{server.base_url}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            **kit.auth(),
        },
        timeout=10,
    )


def introspect(server: LiveServer, kit: ClientKit, token: str) -> dict[str, Any]:
    """RFC 7662 introspection of ``token`` as ``kit``; fails the test unless answered 200."""
    response = httpx.post(
        f"{server.base_url}/introspect", data={"token": token, **kit.auth()}, timeout=10
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def race(
    servers: Sequence[LiveServer], path: str, requests: Sequence[dict[str, Any]]
) -> list[httpx.Response]:
    """One POST to ``path`` per entry of ``requests`` (keyword arguments of ``httpx`` ``post``),
    alternating between the servers, all released at the same moment (connections are opened first
    so that the race is not decided by TCP set-up)."""
    count = len(requests)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    http = [httpx.AsyncClient(base_url=s.base_url, timeout=30, limits=limits) for s in servers]
    try:
        await asyncio.gather(*(http[i % len(http)].get("/healthz") for i in range(count)))
        start = asyncio.Event()

        async def one(i: int) -> httpx.Response:
            await start.wait()
            return await http[i % len(http)].post(path, **requests[i])

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(client.aclose() for client in http))
