"""The three-party flow (issue 6 point 5) as a new user runs it: ``examples/three_party/run.py`` starts
three real ``trustplane serve`` processes (arranger, broker, clearing), each with its own data
directory, database and keys, and two reference services behind the PEP SDK (the broker's execution
API, the clearing's settlement API), and drives steps 1-4 and 6 of the reference lifecycle over HTTP.
The script checks every step itself (act chain, provenance, narrowing, txn, mandate, both PDPs, the
settlement's Idempotency-Key, both ledgers) and exits non-zero on the first failure; this test runs it
and checks what it reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "three_party" / "run.py"


def test_three_party_flow_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for number in ("[1]", "[2]", "[3]", "[4]", "[6]"):
        assert number in out
    txn = re.search(r"OK: transaction (\S+) ran through three deployments", out)
    assert txn is not None, out[-2000:]
    assert '"sub": "partner:arranger:u_' in out  # the clearing token keeps the origin, namespaced
    # step 3: the broker's execution API (PEP + broker PDP) executed and refused above the notional
    assert "trade.executed:" in out
    assert '"state": "executed"' in out
    assert "an order above the token's notional (1.2m EUR): 403 insufficient_scope" in out
    # step 4: the clearing's settlement API, once per Idempotency-Key
    assert "retry, same key and body: 201, the stored result (Idempotency-Replayed: true)" in out
    assert "same key, another body: 422 " in out
    assert "no Idempotency-Key: 400 " in out
    assert "the broker-audience token at the clearing: 401 invalid_token" in out
    assert "the broker's own token (no act chain, no provenance): 403 insufficient_scope" in out
    assert (tmp_path / "clearing" / "settlements.db").exists()
    # three servers each had their own data directory and database
    for name in ("arranger", "broker", "clearing"):
        assert (tmp_path / name / "trustplane.db").exists()
        assert (tmp_path / name / "server.log").exists()


def test_three_party_script_fails_loudly(tmp_path: Path) -> None:
    """The script's failure path: a work directory that already holds the data directories (a
    second run into the same place) stops at once with a non-zero exit, not a half-run flow."""
    (tmp_path / "arranger").mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "OK: transaction" not in proc.stdout
    assert "FAILED: " in proc.stderr
    assert "already exists" in proc.stderr
