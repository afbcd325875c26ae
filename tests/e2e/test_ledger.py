"""The ledger with real ``trustplane serve`` processes: two servers appending concurrently on one
PostgreSQL database make one gap-free log; a server SIGKILLed under load loses no acknowledged entry;
the auditor's CLI (export, verify, monitor) works against what they wrote."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import text

from tests.conftest import EXECUTION, ClientKit, run_sync
from tests.e2e.conftest import (
    PROPAGATION_TIMEOUT,
    START_TIMEOUT,
    TRUSTPLANE,
    LiveServer,
    LiveServers,
    register_client,
    running_servers,
    wait_until,
)
from trustplane.storage.db import Database

pytestmark = pytest.mark.e2e
DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
#: Tokens acknowledged before the SIGKILL: the load is under way, entries wait for integration.
KILL_AFTER = 40


async def _scalar(url: str, sql: str) -> Any:
    db = Database(url)
    try:
        async with db.read() as conn:
            return (await conn.execute(text(sql))).scalar()
    finally:
        await db.dispose()


def pending(server: LiveServer) -> int:
    return int(
        run_sync(
            _scalar(server.env["TRUSTPLANE_DATABASE_URL"], "SELECT count(*) FROM audit_pending")
        )
    )


async def hammer(
    servers: list[LiveServer],
    kit: ClientKit,
    *,
    count: int | None,
    seconds: float,
    workers: int = 12,
    under_way: tuple[int, asyncio.Event] | None = None,
    failures_to_stop: int | None = None,
) -> tuple[list[str], int]:
    """Token requests from ``workers`` concurrent clients spread over ``servers`` until ``count``
    answers, ``failures_to_stop`` failures or ``seconds`` passed; returns the jtis of the tokens
    issued (each an acknowledged, durable audit entry) and how many requests failed (a killed
    server refuses connections). ``under_way``: (n, event) sets the event once n were issued."""
    issued: list[str] = []
    failed = 0
    deadline = time.monotonic() + seconds
    clients = [httpx.AsyncClient(base_url=s.base_url, timeout=10.0) for s in servers]

    def going() -> bool:
        if failures_to_stop is not None and failed >= failures_to_stop:
            return False
        return time.monotonic() < deadline and (count is None or len(issued) + failed < count)

    async def worker(n: int) -> None:
        nonlocal failed
        http = clients[n % len(clients)]
        while going():
            form = {
                "grant_type": "client_credentials",
                "scope": "order:create",
                "resource": EXECUTION,
                **kit.auth(),
            }
            try:
                response = await http.post("/token", data=form)
            except httpx.TransportError:
                failed += 1
                await asyncio.sleep(0.01)
                continue
            if response.status_code == 200:
                token = response.json()["access_token"]
                issued.append(jwt.decode(token, options={"verify_signature": False})["jti"])
                if under_way is not None and len(issued) >= under_way[0]:
                    under_way[1].set()
            else:
                failed += 1

    try:
        await asyncio.gather(*(worker(n) for n in range(workers)))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return issued, failed


def export_and_verify(server: LiveServer, tmp: Path, fmt: str = "jsonl") -> list[dict[str, Any]]:
    """The auditor's path: export + checkpoint + public key, then `audit verify` (exit 0 or fail)."""
    export, checkpoint = tmp / f"export.{fmt}", tmp / "checkpoint.txt"
    server.cli(
        "audit",
        "export",
        "--out",
        str(export),
        "--format",
        fmt,
        "--checkpoint-out",
        str(checkpoint),
    )
    key = server.cli("audit", "public-key").strip()
    report = json.loads(
        server.cli(
            "audit",
            "verify",
            str(export),
            "--checkpoint",
            str(checkpoint),
            "--public-key",
            key,
            "--json",
        )
    )
    assert report["ok"], report
    assert any("recomputed root equals the signed root" in line for line in report["proved"])
    if fmt != "jsonl":
        return []
    return [json.loads(line) for line in export.read_text().splitlines()]


def wait_integrated(server: LiveServer) -> None:
    wait_until(
        lambda: pending(server) == 0, PROPAGATION_TIMEOUT, "the sequencer to integrate everything"
    )


def issued_jtis(records: list[dict[str, Any]]) -> list[str]:
    return [r["entry"]["jti"] for r in records if r["entry"]["type"] == "oauth:token:issued"]


@pytest.mark.postgres
def test_two_servers_appending_concurrently_make_one_log(
    live_server: LiveServers, pg_url: str, tmp_path: Path
) -> None:
    cluster = live_server.start_cluster(2, pg_url, audit_integrate_interval="0.1")
    kit = register_client(*cluster)

    issued, failed = run_sync(hammer(cluster, kit, count=400, seconds=60))

    assert failed == 0
    assert len(issued) >= 400  # workers in flight finish their last request
    wait_integrated(cluster[0])
    records = export_and_verify(cluster[0], tmp_path)
    assert [r["index"] for r in records] == list(range(len(records)))
    event_ids = [r["entry"]["event_id"] for r in records]
    assert len(event_ids) == len(set(event_ids))
    assert sorted(issued_jtis(records)) == sorted(issued)  # every one present, exactly once


@pytest.mark.parametrize("database", DATABASES)
def test_sigkill_under_load_loses_no_acknowledged_entry(
    live_server: LiveServers, request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> None:
    url = request.getfixturevalue("pg_url") if database == "postgresql" else None
    # a long interval: the kill finds entries acknowledged but not yet integrated
    server = live_server.start(url, audit_integrate_interval="3")
    kit = register_client(server)
    assert server.process is not None

    async def load_then_kill() -> tuple[list[str], int]:
        """Kill once the load is well under way (entries acknowledged); the load then stops at its
        first refused requests instead of running out its time."""
        loaded = asyncio.Event()
        load = asyncio.create_task(
            hammer(
                [server],
                kit,
                count=None,
                seconds=30.0,
                under_way=(KILL_AFTER, loaded),
                failures_to_stop=12,
            )
        )
        await asyncio.wait_for(loaded.wait(), PROPAGATION_TIMEOUT)
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        return await load

    issued, failed = run_sync(load_then_kill())
    assert server.process.wait(10) == -signal.SIGKILL
    assert issued
    assert failed > 0  # requests kept coming after the kill
    assert pending(server) > 0  # acknowledged, durable, not yet in the tree when the process died

    server.launch()  # the restart integrates what was pending
    server.wait_ready(time.monotonic() + START_TIMEOUT)
    wait_integrated(server)
    records = export_and_verify(server, tmp_path)
    assert set(issued) <= set(issued_jtis(records))


@pytest.fixture(scope="module")
def auditor_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, ClientKit]]:
    """One server and client for the auditor's tests (each exports whatever the log holds by then:
    neither needs a fresh log)."""
    with running_servers(tmp_path_factory.mktemp("auditor")) as servers:
        server = servers.start(audit_integrate_interval="0.1", audit_retention_days='{"*": 3650}')
        yield server, register_client(server)


def test_the_auditor_cli_end_to_end(
    auditor_server: tuple[LiveServer, ClientKit], tmp_path: Path
) -> None:
    server, kit = auditor_server
    run_sync(hammer([server], kit, count=30, seconds=30))
    wait_integrated(server)
    export_and_verify(server, tmp_path, "csv")
    key = server.cli("audit", "public-key").strip()
    metadata = httpx.get(f"{server.base_url}/.well-known/oauth-authorization-server").json()
    assert metadata["audit_log_verifier_key"] == key

    state = tmp_path / "monitor.state"
    first = json.loads(
        server.cli("audit", "monitor", "--state", str(state), "--public-key", key, "--json")
    )
    assert first["ok"]
    assert "baseline" in first["not_proved"][0]
    run_sync(hammer([server], kit, count=10, seconds=30))
    wait_integrated(server)
    second = json.loads(
        server.cli(
            "audit",
            "monitor",
            "--state",
            str(state),
            "--public-key",
            key,
            "--url",
            server.base_url,
            "--token",
            audit_token(server),
            "--json",
        )
    )
    assert second["ok"], second
    assert any("consistency proof verified" in line for line in second["proved"])

    retention = json.loads(server.cli("audit", "retention", "--json"))
    assert retention["retention_days"] == {"*": 3650}
    assert json.loads(server.cli("audit", "purge", "--json")) == {"purged": {}}
    integrated = json.loads(server.cli("audit", "integrate", "--json"))
    assert integrated["tree_size"] >= 40


def audit_token(server: LiveServer) -> str:
    audience = server.issuer + "/audit"
    kit = register_client(
        server, scopes=("audit:query",), resources=(audience,), introspection_resources=()
    )
    form = {
        "grant_type": "client_credentials",
        "scope": "audit:query",
        "resource": audience,
        **kit.auth(),
    }
    response = httpx.post(f"{server.base_url}/token", data=form, timeout=10.0)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def test_verify_and_monitor_exit_non_zero_on_failure(
    auditor_server: tuple[LiveServer, ClientKit], tmp_path: Path
) -> None:
    server, kit = auditor_server
    run_sync(hammer([server], kit, count=5, seconds=30))
    wait_integrated(server)
    export, checkpoint = tmp_path / "export.jsonl", tmp_path / "checkpoint.txt"
    server.cli("audit", "export", "--out", str(export), "--checkpoint-out", str(checkpoint))
    lines = export.read_text().splitlines()
    record = json.loads(lines[-1])
    record["entry"]["client_id"] = "someone-else"
    export.write_text("\n".join([*lines[:-1], json.dumps(record)]) + "\n")
    key = server.cli("audit", "public-key").strip()

    tampered = _cli(
        server, "audit", "verify", str(export), "--checkpoint", str(checkpoint), "--public-key", key
    )
    assert tampered.returncode == 1
    assert f"entry {record['index']}:" in tampered.stdout

    other = "example.org/audit+00000000+AZSXYtNtmr96zY+YQJ4kLZSH9Fk/CTDkDiY5vN2kytk8"
    bad_key = _cli(
        server,
        "audit",
        "verify",
        str(export),
        "--checkpoint",
        str(checkpoint),
        "--public-key",
        other,
    )
    assert bad_key.returncode == 1
    assert "FAILED" in bad_key.stdout


def _cli(server: LiveServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRUSTPLANE, *args], env=server.env, capture_output=True, text=True, timeout=60, check=False
    )
