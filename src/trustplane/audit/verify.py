"""Offline verification of an export, and the monitor's consistency check. Trusts nothing the server
says: the checkpoint's signature is checked with the key the auditor holds, every leaf hash is
recomputed from the entry (RFC 8785 canonical form), the root is recomputed from the leaves or each
inclusion proof is checked against the signed root, and each payload against its salted commitment.

Both produce a :class:`Report` that says what was proved, what was not, and what failed (naming the
index), so that an auditor never reads "OK" as more than it is.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import csv
import hashlib
import io
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from trustplane.audit import merkle
from trustplane.audit.canonical import EntryError, canonical_bytes
from trustplane.audit.note import Checkpoint, NoteError, Verifier, open_checkpoint

MAX_FAILURES_LISTED = 50
_sha256 = hashlib.sha256


@dataclass
class Report:
    proved: list[str] = field(default_factory=list)
    not_proved: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    failed_indices: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str, index: int | None = None) -> None:
        if index is not None and index not in self.failed_indices[-2:]:
            self.failed_indices.append(index)
        if len(self.failures) < MAX_FAILURES_LISTED:
            self.failures.append(message)
        elif len(self.failures) == MAX_FAILURES_LISTED:
            self.failures.append("... more failures not listed")

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "proved": self.proved,
            "not_proved": self.not_proved,
            "failures": self.failures,
            "failed_indices": self.failed_indices,
        }


def _b64(value: Any) -> bytes:
    try:
        return binascii.a2b_base64(str(value), strict_mode=True)
    except binascii.Error:
        raise ValueError("not base64") from None


def read_export(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL or CSV export (by the file's first byte), in file order."""
    with path.open("rb") as handle:
        first = handle.read(1)
        handle.seek(0)
        if first == b"{":
            for line in handle:
                if line.strip():
                    yield orjson.loads(line)
            return
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        for row in csv.DictReader(text):
            yield {
                "index": int(row["index"]),
                "entry": orjson.loads(row["entry"]),
                "leaf_hash": row["leaf_hash"] or None,
                "payload": orjson.loads(row["payload"]) if row["payload"] else None,
                "payload_json": row["payload"] or None,
                "salt": row["salt"] or None,
                "inclusion_proof": row["inclusion_proof"].split()
                if row.get("inclusion_proof")
                else None,
            }


def payload_bytes(record: dict[str, Any]) -> bytes | None:
    """The payload bytes the commitment covers (the export keeps them canonical: sorted keys)."""
    if record.get("payload_json") is not None:
        return str(record["payload_json"]).encode()
    if record.get("payload") is None:
        return None
    return orjson.dumps(record["payload"], option=orjson.OPT_SORT_KEYS)


class ExportVerifier:
    """Feed records in export order; :meth:`finish` returns the report."""

    def __init__(self, checkpoint: Checkpoint, report: Report, *, part: bool = False) -> None:
        """``part``: one slice of a file verified in parallel; its indices start wherever its first
        record says, and its leaf hashes are collected for the parent to fold into the root."""
        self.cp, self.report = checkpoint, report
        self._stack: list[bytes] = []
        self._contiguous = True
        self._expected = -1 if part else 0
        self.first: int | None = None
        self.leaves: bytearray | None = bytearray() if part else None
        self.count = self.proofs = self.payloads = self.purged = self.unproved = 0
        self._seen: set[int] = set()

    def add(self, record: dict[str, Any]) -> None:
        """One record. Written as one flat function: it runs once per leaf of a full export."""
        index = record.get("index")
        if type(index) is not int or index < 0:
            self.report.fail(f"record {self.count}: no valid index")
            self._contiguous = False
            return
        self.count += 1
        if self.first is None:
            self.first = index
            if self._expected < 0:
                self._expected = index
        if index != self._expected:
            self._contiguous = False
            if index in self._seen or index < self._expected:
                self.report.fail(
                    f"entry {index} appears out of order or twice in the export", index
                )
            self._seen.add(index)
        self._expected = index + 1
        entry = record.get("entry")
        try:
            leaf = _sha256(b"\x00" + canonical_bytes(entry)).digest()  # type: ignore[arg-type]
        except (AttributeError, TypeError, EntryError):
            self._contiguous = False
            self.report.fail(f"entry {index}: not a valid canonical envelope", index)
            return
        recorded = record.get("leaf_hash")
        if recorded is not None and _safe_b64(recorded) != leaf:
            self.report.fail(
                f"entry {index}: its content does not hash to the leaf recorded for index {index} "
                "(the entry was altered or moved)",
                index,
            )
        if self._contiguous:
            if self.leaves is not None:
                self.leaves += leaf
            else:
                self._push(leaf)
        if record.get("inclusion_proof") is not None:
            self._check_proof(index, leaf, record["inclusion_proof"])
        else:
            self.unproved += 1
        self._check_payload(index, entry, record)  # type: ignore[arg-type]

    def _push(self, leaf: bytes) -> None:
        """Streaming MTH: the stack holds one perfect subtree per set bit of the count so far."""
        h, c, stack = leaf, self.count, self._stack
        while not c & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            c >>= 1
        stack.append(h)

    def _check_proof(self, index: int, leaf: bytes, proof: Any) -> None:
        if proof is None:
            return
        try:
            path = [_b64(h) for h in proof]
        except ValueError:
            self.report.fail(f"entry {index}: inclusion proof is not base64", index)
            return
        if merkle.verify_inclusion(index, self.cp.size, leaf, path, self.cp.root):
            self.proofs += 1
        else:
            self.report.fail(
                f"entry {index}: inclusion proof does not verify against the signed root", index
            )

    def _check_payload(self, index: int, entry: dict[str, Any], record: dict[str, Any]) -> None:
        data = payload_bytes(record)
        if data is None:
            self.purged += 1
            return
        salt = _safe_b64(record.get("salt"))
        if salt is None:
            self.report.fail(f"entry {index}: payload salt is not base64", index)
            return
        if _sha256(salt + data).hexdigest() == entry.get("payload_hash"):
            self.payloads += 1
        else:
            self.report.fail(f"entry {index}: payload does not match its committed hash", index)

    def finish(self) -> Report:
        r, cp = self.report, self.cp
        full = self._contiguous and self.count == cp.size
        if full:
            size = self.count
            root = merkle.fold(self._stack) if self._stack else merkle.EMPTY_ROOT
            if root == cp.root:
                r.proved.append(
                    f"the export's {size} entries are exactly the log at tree size {size}: "
                    "recomputed root equals the signed root (no entry altered, dropped, added or "
                    "reordered)"
                )
            else:
                r.fail("the root recomputed from the export differs from the signed root")
        elif self.count and self._contiguous and self.count < cp.size:
            r.not_proved.append(
                f"the export holds entries 0..{self.count - 1} of {cp.size}: the root cannot be "
                "recomputed (each entry needs its inclusion proof instead)"
            )
        if self.proofs:
            r.proved.append(f"{self.proofs} inclusion proofs verify against the signed root")
        if not full and self.unproved:
            r.fail(
                f"{self.unproved} entries carry no inclusion proof and the export is not the complete "
                f"log 0..{cp.size - 1}: they are not proved to be in the log (entries missing?)"
            )
        if self.payloads:
            r.proved.append(f"{self.payloads} payloads match their salted commitments")
        if self.purged:
            r.not_proved.append(
                f"{self.purged} payloads are purged (retention): only their commitment remains"
            )
        r.not_proved.append(
            "that the log showed everyone this same checkpoint (split view): run `trustplane audit "
            "monitor` from independent places or compare checkpoints"
        )
        r.not_proved.append("entries appended after this checkpoint")
        return r


def _safe_b64(value: Any) -> bytes | None:
    try:
        return _b64(value)
    except ValueError:
        return None


def open_signed(checkpoint_note: str, verifier_key: str, report: Report) -> Checkpoint | None:
    try:
        verifier = Verifier.parse(verifier_key)
    except NoteError as exc:
        report.fail(f"public key: {exc}")
        return None
    try:
        checkpoint = open_checkpoint(checkpoint_note, verifier)
    except NoteError as exc:
        report.fail(f"checkpoint rejected: {exc}")
        return None
    report.proved.append(
        f"checkpoint signed by {verifier.name} (key id {verifier.key_id:08x}): tree size "
        f"{checkpoint.size}, root {base64.b64encode(checkpoint.root).decode()}"
    )
    return checkpoint


def verify_export(
    records: Iterable[dict[str, Any]],
    checkpoint_note: str,
    verifier_key: str,
    progress: Callable[[int], None] | None = None,
) -> Report:
    report = Report()
    checkpoint = open_signed(checkpoint_note, verifier_key, report)
    if checkpoint is None:
        return report
    verifier = ExportVerifier(checkpoint, report)
    for n, record in enumerate(records, 1):
        verifier.add(record)
        if progress is not None and n % 10_000 == 0:
            progress(n)
    return verifier.finish()


#: Below this size a file is verified in one process (starting workers costs more than it saves).
PARALLEL_MIN_BYTES = 8 << 20


def verify_export_file(
    path: Path, checkpoint_note: str, verifier_key: str, workers: int | None = None
) -> Report:
    """:func:`verify_export` for a file; a large JSONL file is split into byte ranges verified in
    ``workers`` processes, whose leaf hashes are then folded into the root here, in order."""
    workers = workers or os.cpu_count() or 1
    with path.open("rb") as handle:
        jsonl = handle.read(1) == b"{"
    size = path.stat().st_size
    if workers < 2 or not jsonl or size < PARALLEL_MIN_BYTES:
        return verify_export(read_export(path), checkpoint_note, verifier_key)
    report = Report()
    checkpoint = open_signed(checkpoint_note, verifier_key, report)
    if checkpoint is None:
        return report
    bounds = [size * i // workers for i in range(workers + 1)]
    jobs = [(str(path), a, b, checkpoint) for a, b in itertools.pairwise(bounds)]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = list(pool.map(_verify_range, jobs))
    return _merge(parts, checkpoint, report)


def _verify_range(job: tuple[str, int, int, Checkpoint]) -> ExportVerifier:
    path, start, end, checkpoint = job
    part = ExportVerifier(checkpoint, Report(), part=True)
    with open(path, "rb") as handle:
        handle.seek(start)
        if start:
            handle.readline()  # the line that straddles the boundary belongs to the previous range
        position = handle.tell()
        while position < end:
            line = handle.readline()
            if not line:
                break
            position += len(line)
            if line.strip():
                part.add(orjson.loads(line))
    part._stack = []
    return part


def _merge(parts: list[ExportVerifier], checkpoint: Checkpoint, report: Report) -> Report:
    main = ExportVerifier(checkpoint, report)
    expected = 0
    for part in parts:
        report.failures += part.report.failures
        report.failed_indices += part.report.failed_indices
        main.proofs += part.proofs
        main.payloads += part.payloads
        main.purged += part.purged
        main.unproved += part.unproved
        if part.count == 0:
            continue
        if part.first != expected or not part._contiguous:
            main._contiguous = False
            if part.first is not None and part.first < expected:
                report.fail(f"entry {part.first} appears out of order or twice", part.first)
        expected = (part.first or 0) + part.count
        leaves = bytes(part.leaves or b"")
        for offset in range(0, len(leaves), merkle.HASH_SIZE):
            if main._contiguous:
                main.count += 1
                main._push(leaves[offset : offset + merkle.HASH_SIZE])
        if not main._contiguous:
            main.count = expected
    main.count = sum(p.count for p in parts)
    return main.finish()


ConsistencyFetch = Callable[[int, int], list[bytes]]


def check_consistency(
    old_note: str | None, new_note: str, verifier_key: str, fetch: ConsistencyFetch
) -> tuple[Report, Checkpoint | None]:
    """The monitor's check: the new checkpoint is signed, and the log it describes extends the one
    of the last checkpoint seen (RFC 9162 consistency proof). Catches truncation and rewriting."""
    report = Report()
    new = open_signed(new_note, verifier_key, report)
    if new is None:
        return report, None
    if old_note is None:
        report.not_proved.append(
            "no earlier checkpoint to compare with: this one is now the baseline"
        )
        return report, new
    old = open_signed(old_note, verifier_key, Report())
    if old is None:
        report.fail("the stored checkpoint no longer verifies with this key (state file tampered?)")
        return report, None
    if new.size < old.size:
        report.fail(f"the log shrank from {old.size} to {new.size} entries (truncation)")
        return report, None
    if new.size == old.size or old.size == 0:
        if new.size == old.size and new.root != old.root:
            report.fail(f"two different roots for tree size {new.size} (the log was rewritten)")
            return report, None
        report.proved.append(f"consistent with the previous checkpoint at size {old.size}")
        return report, new
    try:
        proof = fetch(old.size, new.size)
    except Exception as exc:
        report.fail(f"could not obtain a consistency proof {old.size} -> {new.size}: {exc}")
        return report, None
    if not merkle.verify_consistency(old.size, new.size, old.root, new.root, proof):
        report.fail(
            f"the log at size {new.size} is not consistent with the checkpoint seen at size "
            f"{old.size}: earlier entries were removed or rewritten"
        )
        return report, None
    report.proved.append(
        f"the log at size {new.size} extends the log at size {old.size} (append-only, RFC 9162 "
        "consistency proof verified)"
    )
    report.not_proved.append("the content of the new entries (use `trustplane audit verify`)")
    return report, new
