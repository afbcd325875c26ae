"""Offline verify throughput in one process, in isolation: builds a JSONL export of ``--entries``
leaves once (cached under ``--dir``, the shape ``bench/ledger.py`` exports: same event fields, real
salted commitments, a signed checkpoint), then times ``verify_export_file(..., workers=1)`` in this
process, alternating the working tree's verifier with a baseline copy (``--baseline DIR``: a
``trustplane`` package tree, e.g. ``git archive cf8b73d src | tar -x -C /tmp/base``), so that both
meet the same load. Prints leaves/s per run, the medians and the load average.

  python bench/verify_profile.py --entries 1090000 --runs 5 --baseline /tmp/base/src
  python bench/verify_profile.py --once            # one verify (for py-spy / callgrind)
  python bench/verify_profile.py --entries 100000 --instructions --baseline /tmp/base/src

Numbers from a shared, loaded 2-vCPU machine are indicative only. ``--instructions`` counts
instructions per leaf under valgrind instead (the difference between an export of ``--entries``
and one of half as many, so start-up cancels): independent of the load, but valgrind hides SHA-NI
(the SHA-256 compression weighs far more than on the CPU) and memory traffic (a copy is a few
instructions): a tie-breaker for small changes, not a substitute for the timed pairs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cryptography.hazmat.primitives.asymmetric import ed25519
from ledger import make_event  # bench/ledger.py's bulk-log event (same fields and sizes)

from trustplane.audit import merkle
from trustplane.audit.canonical import entry_parts
from trustplane.audit.export_format import export_line
from trustplane.audit.note import Checkpoint, Signer
from trustplane.audit.store import StoredEntry


def build(directory: Path, entries: int) -> tuple[Path, str, str]:
    """(export path, checkpoint note, verifier key), built once per size and reused."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"export-{entries}.jsonl"
    note_path, key_path = path.with_suffix(".note"), path.with_suffix(".key")
    if path.exists() and note_path.exists() and key_path.exists():
        return path, note_path.read_text(), key_path.read_text()
    signer = Signer("bench.example/audit", ed25519.Ed25519PrivateKey.generate())
    builder = merkle.TreeBuilder(0, {})
    with path.open("wb") as handle:
        for n in range(entries):
            entry, payload, salt = entry_parts(make_event(n))
            leaf = merkle.leaf_hash(entry)
            builder.append(leaf)
            handle.write(export_line(StoredEntry(n, entry.decode(), leaf, payload.decode(), salt)))
    note = signer.sign(Checkpoint(signer.name, entries, builder.root()).body())
    note_path.write_text(note)
    key_path.write_text(signer.verifier_key)
    return path, note, signer.verifier_key


def one_run(src: str, path: Path, canonical: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one verify with the package under ``src``, in a fresh
    interpreter (so the two trees never share imported modules)."""
    code = (
        "import os, sys, time; from pathlib import Path; "
        f"sys.path.insert(0, {src!r}); "
        "from trustplane.audit.parallel_verify import verify_export_file as v; "
        f"p = Path({str(path)!r}); note = open({str(path.with_suffix('.note'))!r}).read(); "
        f"key = open({str(path.with_suffix('.key'))!r}).read(); "
        "c = os.times(); t = time.perf_counter(); "
        f"r = v(p, note, key, 1, check_canonical={canonical}); "
        "t = time.perf_counter() - t; c = sum(os.times()[:2]) - sum(c[:2]); "
        "assert r.ok, r.failures; print(t, c)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall, cpu = out.stdout.split()
    return float(wall), float(cpu)


def _code(src: str, path: Path, canonical: bool) -> str:
    return (
        "import sys; from pathlib import Path; "
        f"sys.path.insert(0, {src!r}); "
        "from trustplane.audit.parallel_verify import verify_export_file as v; "
        f"p = Path({str(path)!r}); note = open({str(path.with_suffix('.note'))!r}).read(); "
        f"key = open({str(path.with_suffix('.key'))!r}).read(); "
        f"r = v(p, note, key, 1, check_canonical={canonical}); assert r.ok, r.failures"
    )


def instructions(src: str, path: Path, canonical: bool) -> int:
    """Instructions of one verify (a fresh interpreter under valgrind's callgrind)."""
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command = [*valgrind, sys.executable, "-c", _code(src, path, canonical)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    assert found, out.stderr[-2000:]
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_090_000)
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()) / "tp_verify_profile"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", help="a src/ directory holding the baseline trustplane")
    parser.add_argument("--tree", help="the src/ directory measured (default: this checkout's)")
    parser.add_argument("--check-canonical", action="store_true")
    parser.add_argument("--once", action="store_true", help="one in-process verify, no timing")
    parser.add_argument(
        "--instructions", action="store_true", help="instructions per leaf under valgrind"
    )
    args = parser.parse_args()
    path, note, key = build(args.dir, args.entries)
    if args.once:
        verify = importlib.import_module("trustplane.audit.parallel_verify").verify_export_file
        report = verify(path, note, key, 1, check_canonical=args.check_canonical)
        assert report.ok, report.failures
        return
    here = args.tree or str(Path(__file__).resolve().parents[1] / "src")
    trees = {"this tree": here} | ({"baseline": args.baseline} if args.baseline else {})
    if args.instructions:
        half = args.entries // 2
        small, _, _ = build(args.dir, half)
        for name, src in trees.items():
            ir = instructions(src, path, args.check_canonical)
            ir_small = instructions(src, small, args.check_canonical)
            print(
                f"{name:<10} {(ir - ir_small) / (args.entries - half):>10,.0f} instructions per leaf"
            )
        return
    rates: dict[str, list[float]] = {name: [] for name in trees}
    cpu_rates: dict[str, list[float]] = {name: [] for name in trees}
    for run in range(args.runs):
        for name, src in trees.items():
            wall, cpu = one_run(src, path, args.check_canonical)
            rates[name].append(args.entries / wall)
            cpu_rates[name].append(args.entries / cpu)
            print(
                f"run {run + 1} {name:<10} {args.entries / wall:>10,.0f} leaves/s "
                f"{args.entries / cpu:>10,.0f} per CPU-second  (load {os.getloadavg()[0]:.2f})"
            )
    for name in trees:
        print(
            f"median {name:<9} {statistics.median(rates[name]):>10,.0f} leaves/s "
            f"{statistics.median(cpu_rates[name]):>10,.0f} per CPU-second  (runs {args.runs})"
        )
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
