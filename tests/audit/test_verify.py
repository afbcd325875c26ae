"""Offline verification of export files: one process or several (a large JSONL file is split into
byte ranges), same verdicts; what is not proved is said."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.audit.ledger_helpers import event
from trustplane.audit import merkle, verify
from trustplane.audit.canonical import entry_parts
from trustplane.audit.note import Checkpoint, Signer
from trustplane.audit.verify import verify_export_file

N = 3000


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("log.example/audit", ed25519.Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def lines_and_note(signer: Signer) -> tuple[list[bytes], str]:
    builder = merkle.TreeBuilder(0, {})
    lines = []
    for n in range(N):
        entry, payload, salt = entry_parts(event(n))
        leaf = merkle.leaf_hash(entry)
        builder.append(leaf)
        record = {
            "index": n,
            "entry": orjson.loads(entry),
            "leaf_hash": base64.b64encode(leaf).decode(),
            "payload": orjson.loads(payload),
            "salt": base64.b64encode(salt).decode(),
        }
        lines.append(orjson.dumps(record))
    return lines, signer.sign(Checkpoint(signer.name, N, builder.root()).body())


@pytest.fixture(params=[1, 3], ids=["one-process", "three-processes"])
def workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(verify, "PARALLEL_MIN_BYTES", 1)
    return int(request.param)


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_an_intact_export_verifies(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    lines, note = lines_and_note
    report = verify_export_file(
        write(tmp_path / "e.jsonl", lines), note, signer.verifier_key, workers
    )
    assert report.ok, report.failures
    assert f"the export's {N} entries are exactly the log at tree size {N}" in report.proved[1]
    assert f"{N} payloads match their salted commitments" in report.proved


def test_an_altered_entry_is_named(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    lines, note = lines_and_note
    record = orjson.loads(lines[1777])
    record["entry"]["decision"] = "deny"
    altered = [*lines[:1777], orjson.dumps(record), *lines[1778:]]
    report = verify_export_file(
        write(tmp_path / "e.jsonl", altered), note, signer.verifier_key, workers
    )
    assert report.failed_indices == [1777]
    assert report.failures[-1] == "the root recomputed from the export differs from the signed root"


def test_a_dropped_entry_is_not_the_log(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    lines, note = lines_and_note
    report = verify_export_file(
        write(tmp_path / "e.jsonl", [*lines[:100], *lines[101:]]),
        note,
        signer.verifier_key,
        workers,
    )
    assert not report.ok
    assert not any("exactly the log" in line for line in report.proved)
    assert report.failures == [
        f"{N - 1} entries carry no inclusion proof and the export is not the complete log "
        f"0..{N - 1}: they are not proved to be in the log (entries missing?)"
    ]


def test_an_altered_payload_is_named(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    lines, note = lines_and_note
    record = orjson.loads(lines[5])
    record["payload"]["email"] = "someone-else@example"
    altered = [*lines[:5], orjson.dumps(record), *lines[6:]]
    report = verify_export_file(
        write(tmp_path / "e.jsonl", altered), note, signer.verifier_key, workers
    )
    assert report.failures == ["entry 5: payload does not match its committed hash"]


def test_a_purged_payload_is_reported_not_proved(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    lines, note = lines_and_note
    record = orjson.loads(lines[7])
    record["payload"] = record["salt"] = None
    purged = [*lines[:7], orjson.dumps(record), *lines[8:]]
    report = verify_export_file(
        write(tmp_path / "e.jsonl", purged), note, signer.verifier_key, workers
    )
    assert report.ok
    assert "1 payloads are purged (retention): only their commitment remains" in report.not_proved
