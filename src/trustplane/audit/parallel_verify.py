"""Verifying an export file (`trustplane audit verify`), in one process or several.

A large JSONL file is split into byte ranges, one per worker process; each verifies its range
(:class:`~trustplane.audit.export_verifier.ExportVerifier` with ``part=True``) and returns the
aligned perfect subtrees of its leaves, which the parent folds into the root in order (RFC 9162
§2.1.1: the Merkle Tree Hash of a range is determined by its perfect subtrees). The verdicts are
those of one process; only the wall time differs. CSV goes through the general reader.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

from trustplane.audit.export_format import read_export
from trustplane.audit.export_verifier import ExportVerifier, verify_export
from trustplane.audit.note import Checkpoint
from trustplane.audit.report import MAX_FAILURES_LISTED, MORE_FAILURES, Report, open_signed

#: Below this size a file is verified in one process (starting workers costs more than it saves).
PARALLEL_MIN_BYTES = 8 << 20
#: Bytes of lines verified at a time (a run of the verifier).
BLOCK_BYTES = 4 << 20
#: The file's read buffer (the default 8 KiB would cost a system call every ten lines).
READ_BUFFER = 1 << 20


def read_lines(path: Path, start: int, end: int) -> Iterator[list[bytes]]:
    """Blocks of about :data:`BLOCK_BYTES` of the lines of a file that begin in the byte range
    ``[start, end)``, each with its newline (a line straddling ``start`` belongs to the range
    before; one straddling ``end`` to this one). ``readlines`` finds the newlines with ``memchr``,
    several times faster than ``bytes.split`` (which tests every byte)."""
    with path.open("rb", buffering=READ_BUFFER) as handle:
        if start:
            handle.seek(start - 1)
            handle.readline()  # the rest of the line that began before start
        pos = handle.tell()  # where the next line begins
        while pos < end and (lines := handle.readlines(BLOCK_BYTES)):
            after = handle.tell()
            if after > end:  # the range ends in this block: keep the lines that begin before end
                at, keep = pos, 0
                while at < end:
                    at += len(lines[keep])
                    keep += 1
                del lines[keep:]
            yield lines
            pos = after


def verify_export_file(
    path: Path,
    checkpoint_note: str,
    verifier_key: str,
    workers: int | None = None,
    *,
    check_canonical: bool = False,
) -> Report:
    """Verify an export file. JSONL is read in blocks and each entry hashed as the bytes read; a
    large JSONL file is split into byte ranges verified in ``workers`` processes (default: the CPU
    count), whose perfect subtrees are then folded into the root here, in order."""
    workers = workers or os.cpu_count() or 1
    with path.open("rb") as handle:
        jsonl = handle.read(1) == b"{"
    if not jsonl:
        return verify_export(read_export(path), checkpoint_note, verifier_key)
    report = Report()
    checkpoint = open_signed(checkpoint_note, verifier_key, report)
    if checkpoint is None:
        return report
    size = path.stat().st_size
    if workers < 2 or size < PARALLEL_MIN_BYTES:
        verifier = ExportVerifier(checkpoint, report, check_canonical=check_canonical)
        for lines in read_lines(path, 0, size):
            verifier.scan(lines, terminated=True)
        return verifier.finish()
    bounds = [size * i // workers for i in range(workers + 1)]
    jobs = [(path, a, b, checkpoint, check_canonical) for a, b in itertools.pairwise(bounds)]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = list(pool.map(_verify_range, jobs))
    return _merge(parts, checkpoint, report, check_canonical)


def _verify_range(job: tuple[Path, int, int, Checkpoint, bool]) -> ExportVerifier:
    """In a worker: the lines that begin in one byte range."""
    path, start, end, checkpoint, check_canonical = job
    part = ExportVerifier(checkpoint, Report(), part=True, check_canonical=check_canonical)
    for lines in read_lines(path, start, end):
        part.scan(lines, terminated=True)
    return part


def _merge(
    parts: list[ExportVerifier], checkpoint: Checkpoint, report: Report, check_canonical: bool
) -> Report:
    """The parts' counts and failures, and their subtrees folded in order while the ranges join
    without a gap (a range that does not start where the one before ended breaks the root)."""
    main = ExportVerifier(checkpoint, report, check_canonical=check_canonical)
    expected = position = 0
    for part in parts:
        report.failures += part.report.failures
        report.failed_indices += part.report.failed_indices
        main.proofs += part.proofs
        main.payloads += part.payloads
        main.purged += part.purged
        main.unproved += part.unproved
        main.placeholders += part.placeholders
        main.count += part.count
        if part.count == 0:
            continue
        if part.first != expected or not part.contiguous:
            main.contiguous = False
            if part.first is not None and part.first < expected:
                report.fail(f"entry {part.first} appears out of order or twice", part.first)
        expected = (part.first or 0) + part.count
        if main.contiguous:
            for level, h in zip(part.levels, part.hashes, strict=True):
                position += 1 << level
                main.push_subtree(position, level, h)
    if len(report.failures) > MAX_FAILURES_LISTED + 1:
        report.failures[MAX_FAILURES_LISTED:] = [MORE_FAILURES]
    return main.finish()
