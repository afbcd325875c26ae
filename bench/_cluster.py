"""N ``trustplane serve`` instances behind HAProxy on loopback, on one fresh PostgreSQL database plus
the shared Redis and NATS, for the soak, instance-count and capacity benchmarks; and the process
accounting they share (CPU ticks of a process tree, of this database's PostgreSQL backends, RSS).

HAProxy runs ``deploy/haproxy/haproxy.cfg`` itself, with the server lines past N removed, so the
benchmark measures the deployment example as shipped. Ports come from ``port_base``: the frontend on
the base, instance i on base+i, its operations listener on base+10+i.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from _common import wait_ready

ROOT = Path(__file__).resolve().parents[1]
HAPROXY = Path(os.environ.get("HAPROXY", "/usr/sbin/haproxy"))
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
RESOURCE = "https://execution.example/api"
LEI = "5493001KJTIIGC8Y1R12"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def trustplane() -> str:
    import sys

    return str(Path(sys.executable).parent / "trustplane")


def psql(db: str, sql: str) -> str:
    """One statement through ``psql`` (unaligned, tuples only); its output."""
    return subprocess.run(
        ["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", db, "-Atqc", sql],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


# --------------------------------------------------------------------------- process accounting


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def tree(root: int) -> list[int]:
    children, todo, out = _children(), [root], []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def ticks(pids: list[int]) -> int:
    """utime + stime of these processes (not of their children: list the tree)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def pids_named(name: str) -> list[int]:
    """PIDs whose command name is ``name`` (the shared Redis, for instance)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as handle:
                    if handle.read().strip() == name:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def pg_backends(db: str) -> list[int]:
    """PIDs of the PostgreSQL backends connected to ``db`` (our instances' pools)."""
    out = psql(
        db,
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    return [int(p) for p in out.split()]


def pg_counters(db: str) -> dict[str, int]:
    row = psql(
        db,
        "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched "
        "FROM pg_stat_database WHERE datname = current_database()",
    )
    names = (
        "xact_commit",
        "xact_rollback",
        "tup_inserted",
        "tup_updated",
        "tup_deleted",
        "tup_fetched",
    )
    return dict(zip(names, (int(v) for v in row.split("|")), strict=True))


def relation_sizes(db: str) -> dict[str, int]:
    """pg_total_relation_size (heap + indexes + TOAST) of every table in the public schema."""
    out = psql(
        db,
        "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind = 'r'",
    )
    return {name: int(size) for name, size in (line.split("|") for line in out.splitlines())}


# --------------------------------------------------------------------------- the cluster


def cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [trustplane(), *args], env=env, capture_output=True, text=True, check=True
    ).stdout


@dataclass
class Cluster:
    """``instances`` servers (behind HAProxy unless ``haproxy`` is False) on a fresh database."""

    instances: int
    work: Path
    port_base: int
    haproxy: bool = True
    database_url: str | None = None  # instances connect here (a proxy) instead of PostgreSQL
    extra_env: dict[str, str] = field(default_factory=dict)
    db: str = field(default_factory=lambda: f"capacity_{uuid.uuid4().hex[:8]}")
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proxy: subprocess.Popen[bytes] | None = None
    client_id: str = ""
    pem: bytes = b""

    @property
    def front(self) -> int:
        return self.port_base if self.haproxy else self.port_base + 1

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.front}"

    def start(self) -> Cluster:
        self.work.mkdir(parents=True, exist_ok=True)
        psql("postgres", f'CREATE DATABASE "{self.db}"')
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
        env.update(
            TRUSTPLANE_DATABASE_URL=self.database_url
            or f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.db}",
            TRUSTPLANE_REDIS_URL="redis://127.0.0.1:6379/0",
            TRUSTPLANE_NATS_URL="nats://127.0.0.1:4222",
            TRUSTPLANE_NATS_STREAM=f"CAPACITY_{self.db.upper()}",
            TRUSTPLANE_NATS_SUBJECT=f"capacity.{self.db}",
            TRUSTPLANE_ISSUER=self.issuer,
            TRUSTPLANE_LOG_LEVEL="warning",
            TRUSTPLANE_KEY_ROTATION_INTERVAL="0",
            TRUSTPLANE_DATA_DIR=str(self.work / "data"),
        )
        env.update(self.extra_env)
        env["TRUSTPLANE_KEY_ENCRYPTION_KEY"] = cli(env, "keys", "new-kek").strip()
        self.env = env
        cli(env, "migrate")
        self._client()
        for i in range(1, self.instances + 1):
            self.procs.append(self._serve(i))
        if self.haproxy:
            self.proxy = self._haproxy()
        for i in range(1, self.instances + 1):
            wait_ready(f"http://127.0.0.1:{self.port_base + 10 + i}/readyz", timeout=60)
        wait_ready(f"{self.issuer}/healthz", timeout=30)
        return self

    def _client(self) -> None:
        keys = self.work / "client"
        cli(self.env, "clients", "keygen", "--out", str(keys), "--kid", "bench-key")
        added = cli(
            self.env, "clients", "add", "--lei", LEI, "--scope", "order:create",
            "--scope", "decision:evaluate", "--resource", RESOURCE,
            "--resource", f"{self.issuer}/access/v1", "--jwks-file", str(keys / "jwks.json"),
            "--grant-type", "client_credentials",
            "--grant-type", "urn:ietf:params:oauth:grant-type:token-exchange",
            "--name", "capacity bench", "--json",
        )  # fmt: skip
        self.client_id = json.loads(added)["client_id"]
        self.pem = (keys / "key.pem").read_bytes()

    def _serve(self, i: int) -> subprocess.Popen[bytes]:
        env = {
            **self.env,
            "TRUSTPLANE_PORT": str(self.port_base + i),
            "TRUSTPLANE_OPS_PORT": str(self.port_base + 10 + i),
            "TRUSTPLANE_DATA_DIR": str(self.work / f"tp{i}"),
        }
        (self.work / f"tp{i}").mkdir(exist_ok=True)
        log = (self.work / f"tp{i}.log").open("wb")
        return subprocess.Popen(
            [trustplane(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def _haproxy(self) -> subprocess.Popen[bytes]:
        if not HAPROXY.exists():
            raise SystemExit(f"{HAPROXY} is missing (apt-get install haproxy)")
        shipped = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text().splitlines()
        keep = [f"server tp{i} " for i in range(1, self.instances + 1)]
        lines = [
            line
            for line in shipped
            if not line.strip().startswith("server tp") or any(k in line for k in keep)
        ]
        cfg = self.work / "haproxy.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        env = {**self.env, "TP_BIND": "127.0.0.1", "TP_FRONT_PORT": str(self.port_base)}
        for i in range(1, 4):
            env[f"TP_PORT{i}"] = str(self.port_base + i)
            env[f"TP_OPS{i}"] = str(self.port_base + 10 + i)
        log = (self.work / "haproxy.log").open("wb")
        return subprocess.Popen(
            [str(HAPROXY), "-db", "-f", str(cfg)], env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def instance_pids(self) -> list[list[int]]:
        return [tree(p.pid) for p in self.procs]

    def stop(self, drop: bool = True) -> None:
        for proc in [*self.procs, *([self.proxy] if self.proxy else [])]:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        self.procs, self.proxy = [], None
        if drop:
            psql("postgres", f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    def tracebacks(self) -> list[str]:
        return [
            log.name
            for log in sorted(self.work.glob("tp*.log"))
            if "Traceback" in log.read_text(errors="replace")
        ]
