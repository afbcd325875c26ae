"""Offline verification of export files: one process or several (a large JSONL file is split into
byte ranges), same verdicts; what is not proved is said. The JSONL lines are what `trustplane audit
export` writes (entry and payload verbatim); older lines (entry as a parsed object) still verify."""

from __future__ import annotations

import base64
import hashlib
import itertools
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.audit.ledger_helpers import event
from trustplane.audit import merkle, parallel_verify
from trustplane.audit.canonical import entry_parts
from trustplane.audit.export_format import export_line
from trustplane.audit.note import Checkpoint, Signer
from trustplane.audit.parallel_verify import verify_export_file
from trustplane.audit.store import StoredEntry

N = 3000


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("log.example/audit", ed25519.Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def stored_and_note(signer: Signer) -> tuple[list[StoredEntry], str]:
    builder = merkle.TreeBuilder(0, {})
    stored = []
    for n in range(N):
        entry, payload, salt = entry_parts(event(n))
        leaf = merkle.leaf_hash(entry)
        builder.append(leaf)
        stored.append(StoredEntry(n, entry.decode(), leaf, payload.decode(), salt))
    return stored, signer.sign(Checkpoint(signer.name, N, builder.root()).body())


@pytest.fixture(scope="module")
def lines_and_note(stored_and_note: tuple[list[StoredEntry], str]) -> tuple[list[bytes], str]:
    """The export format: one line per entry, entry and payload embedded verbatim."""
    stored, note = stored_and_note
    return [export_line(item).rstrip(b"\n") for item in stored], note


@pytest.fixture(scope="module")
def older_lines(stored_and_note: tuple[list[StoredEntry], str]) -> list[bytes]:
    """Lines of the earlier export shape: the entry and payload as parsed JSON objects."""
    stored, _ = stored_and_note
    return [
        orjson.dumps(
            {
                "index": item.index,
                "entry": orjson.loads(item.entry),
                "leaf_hash": base64.b64encode(item.leaf_hash).decode(),
                "payload": orjson.loads(item.payload or "null"),
                "salt": base64.b64encode(item.salt or b"").decode(),
            }
        )
        for item in stored
    ]


@pytest.fixture(
    params=[1, 3, "one-block"], ids=["one-process", "three-processes", "one-process-one-block"]
)
def workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Small blocks (lines straddle blocks and ranges; a block of common lines is sliced as a
    whole, others line by line), or the whole file as one block (one run of N entries: the
    checks of a run at once meet the altered line among thousands of intact ones)."""
    if request.param == "one-block":
        return 1
    monkeypatch.setattr(parallel_verify, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(parallel_verify, "BLOCK_BYTES", 1000)
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
    altered = [
        *lines[:1777],
        lines[1777].replace(b'"decision":"allow"', b'"decision":"deny"'),
        *lines[1778:],
    ]
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
    altered = [*lines[:5], lines[5].replace(b"trader5@", b"someone-else@"), *lines[6:]]
    report = verify_export_file(
        write(tmp_path / "e.jsonl", altered), note, signer.verifier_key, workers
    )
    assert report.failures == ["entry 5: payload does not match its committed hash"]


def test_a_purged_payload_is_reported_not_proved(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    lines, note = lines_and_note
    record = orjson.loads(lines[7])
    purged_line = (
        lines[7]
        .replace(orjson.dumps(record["payload"]), b"null")
        .replace(b'"' + record["salt"].encode() + b'"', b"null")
    )
    purged = [*lines[:7], purged_line, *lines[8:]]
    report = verify_export_file(
        write(tmp_path / "e.jsonl", purged), note, signer.verifier_key, workers
    )
    assert report.ok
    assert "1 payloads are purged (retention): only their commitment remains" in report.not_proved


def one_byte_changed(line: bytes, at: int) -> bytes:
    """``line`` with the byte at ``at`` replaced by another printable one (JSON stays valid)."""
    other = b"B" if line[at : at + 1] == b"A" else b"A"
    return line[:at] + other + line[at + 1 :]


@pytest.mark.parametrize(
    ("where", "marker", "offset", "failure"),
    [
        (
            "entry",
            b'"transaction_id":"txn-',
            len(b'"transaction_id":"'),
            "entry 2345: its content does not hash to the leaf recorded for index 2345 "
            "(the entry was altered or moved)",
        ),
        (
            "payload",
            b'"email":"',
            len(b'"email":"'),
            "entry 2345: payload does not match its committed hash",
        ),
        (
            "salt",
            b'"salt":"',
            len(b'"salt":"'),
            "entry 2345: payload does not match its committed hash",
        ),
    ],
)
def test_one_byte_changed_in_the_verbatim_bytes_is_named(
    tmp_path: Path,
    lines_and_note: tuple[list[bytes], str],
    signer: Signer,
    workers: int,
    where: str,
    marker: bytes,
    offset: int,
    failure: str,
) -> None:
    lines, note = lines_and_note
    line = lines[2345]
    at = line.index(marker) + offset
    tampered = one_byte_changed(line, at)
    assert orjson.loads(tampered)  # still a well-formed line: only the one byte differs
    altered = [*lines[:2345], tampered, *lines[2346:]]
    report = verify_export_file(
        write(tmp_path / "e.jsonl", altered), note, signer.verifier_key, workers
    )
    assert report.failed_indices == [2345], where
    assert report.failures[0] == failure
    if where == "entry":
        assert report.failures[-1] == (
            "the root recomputed from the export differs from the signed root"
        )
    else:  # the leaf is intact: the log is proved, the payload is not
        assert report.failures == [failure]
        assert any("exactly the log" in line for line in report.proved)


def test_one_byte_changed_in_the_commitment_is_named(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    """The commitment is inside the entry: its leaf, its payload check and the root all fail."""
    lines, note = lines_and_note
    line = lines[2345]
    at = line.index(b'"payload_hash":"') + len(b'"payload_hash":"')
    digit = b"1" if line[at : at + 1] == b"0" else b"0"
    tampered = line[:at] + digit + line[at + 1 :]
    altered = [*lines[:2345], tampered, *lines[2346:]]
    report = verify_export_file(
        write(tmp_path / "e.jsonl", altered), note, signer.verifier_key, workers
    )
    assert report.failed_indices == [2345]
    assert report.failures == [
        "entry 2345: its content does not hash to the leaf recorded for index 2345 "
        "(the entry was altered or moved)",
        "entry 2345: payload does not match its committed hash",
        "the root recomputed from the export differs from the signed root",
    ]


def test_a_checkpoint_with_another_root_is_not_the_export(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    """Signed by the right key, one bit of the root changed: every leaf and payload checks, the
    root does not."""
    lines, note = lines_and_note
    checkpoint = Checkpoint.parse(note.split("\n\n")[0] + "\n")
    root = bytes([checkpoint.root[0] ^ 1]) + checkpoint.root[1:]
    other = signer.sign(Checkpoint(checkpoint.origin, N, root).body())
    report = verify_export_file(
        write(tmp_path / "e.jsonl", lines), other, signer.verifier_key, workers
    )
    assert report.failures == ["the root recomputed from the export differs from the signed root"]
    assert f"{N} payloads match their salted commitments" in report.proved


@pytest.mark.parametrize(
    ("members", "proved"),
    [
        (b'"payload_hash":"{good}","payload_hash":"{bad}"', False),  # a parse keeps the last
        (b'"payload_hash":"{bad}","payload_hash":"{good}"', True),
        (b'"a":{{"payload_hash":"{good}"}},"payload_hash":"{bad}"', False),  # nested: not it
        (b'"a":{{"payload_hash":"{bad}"}},"payload_hash":"{good}"', True),
    ],
    ids=["twice-first-good", "twice-last-good", "nested-good", "nested-bad"],
)
def test_the_commitment_is_the_member_a_parse_finds_among_intact_entries(
    tmp_path: Path,
    stored_and_note: tuple[list[StoredEntry], str],
    signer: Signer,
    members: bytes,
    proved: bool,
) -> None:
    """An entry whose text holds the marker twice, or once inside a nested object, among N intact
    entries in one block: the check of the whole run at once must not take the first marker's
    value for the commitment (a parse finds the last member, at the top level)."""
    stored, _ = stored_and_note
    item = stored[500]
    assert item.salt is not None
    assert item.payload is not None
    good = hashlib.sha256(item.salt + item.payload.encode()).hexdigest().encode()
    text = b"{" + members.replace(b"{good}", good).replace(b"{bad}", b"0" * 64) + b"}"
    text = text.replace(b"{{", b"{").replace(b"}}", b"}")
    odd = StoredEntry(500, text.decode(), merkle.leaf_hash(text), item.payload, item.salt)
    entries = [*stored[:500], odd, *stored[501:]]
    note = signer.sign(
        Checkpoint(signer.name, N, merkle.MemoryTree(e.leaf_hash for e in entries).root()).body()
    )
    path = write(tmp_path / "e.jsonl", [export_line(e).rstrip(b"\n") for e in entries])
    report = verify_export_file(path, note, signer.verifier_key, 1)
    if proved:
        assert report.ok, report.failures
    else:
        assert report.failures == ["entry 500: payload does not match its committed hash"]
    assert any("exactly the log" in line for line in report.proved)


def test_a_tampered_entry_with_its_recorded_leaf_hash_still_fails_at_the_root(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    """The recorded leaf hash only names the entry; the proof is the recomputed root."""
    lines, note = lines_and_note
    record = orjson.loads(lines[42])
    entry = orjson.dumps(record["entry"], option=orjson.OPT_SORT_KEYS).replace(b"allow", b"deny")
    forged = export_line(
        StoredEntry(
            42,
            entry.decode(),
            merkle.leaf_hash(entry),
            orjson.dumps(record["payload"], option=orjson.OPT_SORT_KEYS).decode(),
            base64.b64decode(record["salt"]),
        )
    ).rstrip(b"\n")
    report = verify_export_file(
        write(tmp_path / "e.jsonl", [*lines[:42], forged, *lines[43:]]),
        note,
        signer.verifier_key,
        workers,
    )
    assert report.failures == ["the root recomputed from the export differs from the signed root"]


def test_swapped_lines_are_detected(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer, workers: int
) -> None:
    lines, note = lines_and_note
    swapped = [*lines[:10], lines[11], lines[10], *lines[12:]]
    report = verify_export_file(
        write(tmp_path / "e.jsonl", swapped), note, signer.verifier_key, workers
    )
    assert not report.ok
    assert "entry 10 appears out of order or twice in the export" in report.failures
    assert not any("exactly the log" in line for line in report.proved)


def test_a_checkpoint_signed_by_another_key_is_rejected(
    tmp_path: Path, lines_and_note: tuple[list[bytes], str], signer: Signer
) -> None:
    lines, _ = lines_and_note
    other = Signer(signer.name, ed25519.Ed25519PrivateKey.generate())
    forged = other.sign(Checkpoint(signer.name, N, b"\0" * 32).body())
    report = verify_export_file(write(tmp_path / "e.jsonl", lines), forged, signer.verifier_key)
    assert not report.ok
    assert report.failures[0].startswith("checkpoint rejected:")


def test_older_export_lines_still_verify(
    tmp_path: Path,
    older_lines: list[bytes],
    lines_and_note: tuple[list[bytes], str],
    signer: Signer,
    workers: int,
) -> None:
    lines, note = lines_and_note
    mixed = [*older_lines[:1000], *lines[1000:2000], *older_lines[2000:]]
    report = verify_export_file(
        write(tmp_path / "e.jsonl", mixed), note, signer.verifier_key, workers
    )
    assert report.ok, report.failures
    assert f"{N} payloads match their salted commitments" in report.proved


def test_a_filtered_export_verifies_each_inclusion_proof(
    tmp_path: Path, stored_and_note: tuple[list[StoredEntry], str], signer: Signer
) -> None:
    stored, note = stored_and_note
    tree = merkle.MemoryTree(item.leaf_hash for item in stored)
    picked = [7, 1000, 2999]
    lines = [export_line(stored[i], tree.inclusion(i, N)).rstrip(b"\n") for i in picked]
    report = verify_export_file(write(tmp_path / "e.jsonl", lines), note, signer.verifier_key)
    assert report.ok, report.failures
    assert "3 inclusion proofs verify against the signed root" in report.proved
    bad = tree.inclusion(1000, N)
    bad[3] = bytes(32)
    lines[1] = export_line(stored[1000], bad).rstrip(b"\n")
    report = verify_export_file(write(tmp_path / "e.jsonl", lines), note, signer.verifier_key)
    assert report.failures == [
        "entry 1000: inclusion proof does not verify against the signed root"
    ]


def test_check_canonical_refuses_an_entry_not_in_rfc8785_form(
    tmp_path: Path, signer: Signer
) -> None:
    """A log whose writer stored a non-canonical entry: the bytes are the log's (the root
    matches), so only ``check_canonical`` says the entry is not in RFC 8785 form."""
    entry, payload, salt = entry_parts(event(0))
    loose = entry.replace(b'"decision":', b'"decision": ')
    stored = StoredEntry(0, loose.decode(), merkle.leaf_hash(loose), payload.decode(), salt)
    note = signer.sign(Checkpoint(signer.name, 1, merkle.leaf_hash(loose)).body())
    path = write(tmp_path / "e.jsonl", [export_line(stored).rstrip(b"\n")])
    assert verify_export_file(path, note, signer.verifier_key).ok
    strict = verify_export_file(path, note, signer.verifier_key, check_canonical=True)
    assert strict.failures == ["entry 0: not in RFC 8785 canonical form"]


def test_a_brace_in_an_earlier_field_takes_the_parsing_path(tmp_path: Path, signer: Signer) -> None:
    """``{`` before ``payload_hash`` (here in ``client_id``): the commitment is read from a JSON
    parse of the entry, with the same verdicts."""
    entry, payload, salt = entry_parts(event(0, client_id='{"payload_hash":"0"}'))
    stored = StoredEntry(0, entry.decode(), merkle.leaf_hash(entry), payload.decode(), salt)
    note = signer.sign(Checkpoint(signer.name, 1, merkle.leaf_hash(entry)).body())
    line = export_line(stored).rstrip(b"\n")
    report = verify_export_file(write(tmp_path / "e.jsonl", [line]), note, signer.verifier_key)
    assert report.ok, report.failures
    assert "1 payloads match their salted commitments" in report.proved
    tampered = line.replace(b"trader0@", b"trader9@")
    report = verify_export_file(write(tmp_path / "e.jsonl", [tampered]), note, signer.verifier_key)
    assert report.failures == ["entry 0: payload does not match its committed hash"]


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_byte_ranges_read_every_line_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, trailing_newline: bool
) -> None:
    monkeypatch.setattr(parallel_verify, "BLOCK_BYTES", block)
    lines = [b"x" * (n % 13) + str(n).encode() + b"\n" for n in range(200)]
    if not trailing_newline:
        lines[-1] = lines[-1][:-1]
    path = tmp_path / "lines"
    path.write_bytes(b"".join(lines))
    size = path.stat().st_size
    for parts in (1, 2, 3, 7, 50):
        bounds = [size * i // parts for i in range(parts + 1)]
        got = [
            line
            for a, b in itertools.pairwise(bounds)
            for chunk in parallel_verify.read_lines(path, a, b)
            for line in chunk
        ]
        assert got == lines, parts
