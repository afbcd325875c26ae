"""The three-party flow (issue 6 point 5) as a new user runs it: ``examples/three_party/run.py`` starts
three real ``trustplane serve`` processes (arranger, broker, clearing), each with its own data
directory, database and keys, and three reference services behind the PEP SDK (the arranger's order
intake, the broker's execution API, the clearing's settlement API), all over HTTPS with a private CA
the script makes, and drives steps 1-4 and 6 of the reference lifecycle. The script checks every step
itself (act chain, provenance, narrowing, txn, mandate, both PDPs, the settlement's Idempotency-Key,
both ledgers, the sender binding of every token: Alice's DPoP key, the partner clients'
certificates) and exits non-zero on the first failure; this test runs it and checks what it
reports, and that the CA it made is not left behind."""

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
    # sender binding (RFC 8705, RFC 9449): every listener is HTTPS with the example's CA
    assert re.search(r"arranger: https://127\.0\.0\.1:\d+", out)
    assert "Alice's token type: DPoP (cnf.jkt = the session's DPoP key)" in out
    assert "DPoP token + proof (+ the order service's certificate): 202 accepted for Alice" in out
    assert "Alice's DPoP-bound token replayed as Bearer: 401 invalid_token (DPoP challenge)" in out
    assert "the same DPoP proof again: 401 invalid_dpop_proof (DPoP challenge)" in out
    assert "Alice's token with a proof of another key: 401 invalid_token (DPoP challenge)" in out
    # each derived token names the certificate of the client that asked for it, not its subject's
    arranger_x5t = _bound(out, "broker token bound to: the arranger order service's certificate")
    broker_x5t = _bound(out, "clearing token bound to: the broker execution service's certificate")
    assert arranger_x5t != broker_x5t
    assert f'"x5t#S256": "{arranger_x5t}"' in out
    assert f'"x5t#S256": "{broker_x5t}"' in out
    assert (
        "the broker token without the arranger's certificate: 401 invalid_token (Bearer challenge)"
        in out
    )
    assert (
        "the clearing token replayed as a plain Bearer token (no certificate): "
        "401 invalid_token (Bearer challenge)" in out
    )
    assert (
        "the clearing token sent with the arranger's certificate (stolen): "
        "401 invalid_token (Bearer challenge)" in out
    )
    # the private CA lives in the work directory only (its key file is private to the user)
    assert (tmp_path / "pki" / "ca.crt").exists()
    assert (tmp_path / "pki" / "ca.key").stat().st_mode & 0o077 == 0
    # three servers each had their own data directory and database
    for name in ("arranger", "broker", "clearing"):
        assert (tmp_path / name / "trustplane.db").exists()
        assert (tmp_path / name / "server.log").exists()


def _bound(out: str, label: str) -> str:
    """The certificate thumbprint the script printed after ``label``."""
    found = re.search(re.escape(label) + r" (\S+)", out)
    assert found is not None, label
    thumbprint = found.group(1)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", thumbprint), thumbprint  # base64url SHA-256
    return thumbprint


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
