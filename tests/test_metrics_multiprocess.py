"""Metrics with several workers: a real ``trustplane serve --workers 2``, requests spread over both
workers, and the operations listener's ``/metrics`` answering the sum (prometheus_client multiprocess
mode, ``trustplane.metrics``). One worker: the default registry, no metrics directory."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tests.e2e.conftest import LiveServer, LiveServers, running_servers
from trustplane import metrics

pytestmark = pytest.mark.e2e
REFUSED = "trustplane_token_refused_total"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LiveServers]:
    with running_servers(tmp_path) as live:
        yield live


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def _refuse_one(server: LiveServer) -> None:
    """One token request on a fresh connection (so the kernel may hand it to either worker)."""
    response = httpx.post(
        f"{server.base_url}/token", data={"grant_type": "client_credentials"}, timeout=10
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def _per_worker(directory: Path) -> dict[str, float]:
    """The refusal counter as each worker's own file holds it (pid -> value)."""
    out: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        for family in MultiProcessCollector.merge([str(path)], accumulate=False):
            for sample in family.samples:
                if sample.name == REFUSED and sample.labels.get("error") == "invalid_client":
                    out[path.stem.removeprefix("counter_")] = sample.value
    return out


def _run_dir(server: LiveServer) -> Path:
    runs = list((Path(server.env["TRUSTPLANE_DATA_DIR"]) / "metrics").glob("run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_two_workers_report_the_sum_of_their_counters(servers: LiveServers) -> None:
    server = servers.start(workers="2")
    directory = _run_dir(server)
    sent = 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # until both workers have answered some (the kernel spreads new connections; bounded)
        while sent < 800 and len([v for v in _per_worker(directory).values() if v > 0]) < 2:
            list(pool.map(lambda _: _refuse_one(server), range(40)))
            sent += 40
    per_worker = _per_worker(directory)
    assert len([v for v in per_worker.values() if v > 0]) == 2, per_worker

    scrape = httpx.get(f"{server.ops_url}/metrics", timeout=10)
    assert scrape.status_code == 200
    assert _sample(scrape.text, REFUSED, error="invalid_client") == sent
    assert sum(per_worker.values()) == sent

    # a gauge every worker holds a copy of is not summed: readiness is 1, not 2
    for _ in range(20):
        assert httpx.get(f"{server.base_url}/readyz", timeout=10).status_code == 200
    scrape = httpx.get(f"{server.ops_url}/metrics", timeout=10)
    assert _sample(scrape.text, "trustplane_ready") == 1.0


def test_a_killed_worker_keeps_its_counts_and_leaves_the_live_gauges(
    servers: LiveServers,
) -> None:
    server = servers.start(workers="2")
    directory = _run_dir(server)
    for _ in range(30):
        _refuse_one(server)
        httpx.get(f"{server.base_url}/readyz", timeout=10)
    victim = next(iter(_per_worker(directory)))
    os.kill(int(victim), signal.SIGKILL)
    # the supervisor replaces it and marks it dead: its live gauge file is removed. The supervisor
    # looks every 0.5 s and pings each live worker on the way; alone this takes a second or two,
    # but in one loaded fresh-clone CI run (two benchmarks beside the suite) it took over 30 s. A
    # cause that fits, found since: a worker killed while the supervisor waited for its answer was
    # noticed only at the end of the health check timeout (now within 0.2 s: tests/test_supervisor.py)
    wait_until(
        lambda: not list(directory.glob(f"gauge_live*_{victim}.db")), 90, "the dead worker's gauges"
    )
    server.wait_ready(time.monotonic() + 30)
    scrape = httpx.get(f"{server.ops_url}/metrics", timeout=10)
    # counters are monotonic: what the dead worker counted still counts
    assert _sample(scrape.text, REFUSED, error="invalid_client") == 30


def test_the_run_directory_is_removed_at_exit_and_stale_ones_at_start(
    servers: LiveServers, tmp_path: Path
) -> None:
    server = servers.start(workers="2")
    directory = _run_dir(server)
    stale = directory.parent / "run-999999999"  # no such process
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"")
    server.stop()
    assert not directory.exists()
    server.launch()
    server.wait_ready(time.monotonic() + 45)
    assert not stale.exists()
    assert _run_dir(server) != directory


def test_one_worker_serves_the_default_registry(servers: LiveServers) -> None:
    server = servers.start()
    for _ in range(3):
        _refuse_one(server)
    scrape = httpx.get(f"{server.ops_url}/metrics", timeout=10)
    assert _sample(scrape.text, REFUSED, error="invalid_client") == 3
    # the process collector exists only in the default registry (not in multiprocess mode)
    assert _sample(scrape.text, "process_cpu_seconds_total") is not None
    assert not (Path(server.env["TRUSTPLANE_DATA_DIR"]) / "metrics").exists()


def test_an_operator_directory_is_emptied_and_kept(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "counter_42.db").write_bytes(b"old")
    (directory / "keep.txt").write_text("not ours")
    previous = os.environ.get(metrics.MULTIPROC_ENV)
    os.environ[metrics.MULTIPROC_ENV] = str(directory)
    try:
        path, owned = metrics.prepare_multiprocess(tmp_path / "data")
        assert (path, owned) == (directory, False)
        assert [p.name for p in directory.iterdir()] == ["keep.txt"]
        metrics.finish_multiprocess(path, owned)
        assert directory.exists()
        assert os.environ[metrics.MULTIPROC_ENV] == str(directory)
    finally:
        if previous is None:
            os.environ.pop(metrics.MULTIPROC_ENV, None)
        else:
            os.environ[metrics.MULTIPROC_ENV] = previous
