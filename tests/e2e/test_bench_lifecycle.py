"""``bench/lifecycle.py`` runs end to end with tiny parameters, so that the benchmark cannot rot: every
lifecycle completes through the real servers, each outbox row reaches JetStream once. The revocation
part (``--ssf-rounds``) is left out: it is ``tests/e2e/ssf_chain.py``, which ``test_ssf.py`` runs on
the same three deployments, and three more servers here cost the suite half a minute. Numbers are
printed by the bench, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL, require_service

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "lifecycle.py"
LIFECYCLES = 5


def test_the_lifecycle_bench_runs_with_tiny_parameters(tmp_path: Path) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("NATS", "127.0.0.1", 4222)
    out = tmp_path / "summary.jsonl"
    command = [sys.executable, str(BENCH), "--lifecycles", str(LIFECYCLES), "--quick"]
    command += ["--ssf-rounds", "0"]
    command += ["--database-url", PG_ADMIN_URL, "--json", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads(out.read_text())

    assert set(summary["idle_cpu_ms_per_s"]) >= {"auth", "pdp", "publisher", "postgres"}
    phases = summary["phases"]
    assert [p["concurrency"] for p in phases] == [1, 2]
    for result in phases:
        assert (result["lifecycles"], result["failed"]) == (LIFECYCLES, {})
        assert {s["n"] for s in result["steps"].values()} == {LIFECYCLES}
        assert set(result["cpu_ms_per_lifecycle"]) >= {"auth", "pdp", "execution", "allocation",
                                                       "settlement", "publisher", "postgres"}  # fmt: skip
        assert result["jetstream_ack"]["n"] >= 6 * LIFECYCLES
    # the idempotency check (create + execute), one warm-up lifecycle, the two phases: six events
    # per lifecycle (order.created and five transitions), each published once
    rows = 2 + 6 * (1 + 2 * LIFECYCLES)
    assert summary["outbox_rows"] == rows
    assert summary["jetstream"] == {"messages": rows, "outbox_rows": rows}
    assert "revocation" not in summary
