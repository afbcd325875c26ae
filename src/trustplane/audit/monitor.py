"""The monitor's check (`trustplane audit monitor`): a new checkpoint is signed by the log's key, and
the log it describes extends the one of the last checkpoint seen, proved by an RFC 9162 §2.1.4
consistency proof. Catches truncation and rewriting; a split view (another checkpoint shown to
others) needs checkpoints compared between independent monitors."""

from __future__ import annotations

from collections.abc import Callable

from trustplane.audit import merkle
from trustplane.audit.note import Checkpoint
from trustplane.audit.report import Report, open_signed

#: ``fetch(first, second)``: the consistency proof between the two tree sizes (RFC 9162 §2.1.4).
ConsistencyFetch = Callable[[int, int], list[bytes]]


def check_consistency(
    old_note: str | None, new_note: str, verifier_key: str, fetch: ConsistencyFetch
) -> tuple[Report, Checkpoint | None]:
    """The report, and the checkpoint to keep as the next baseline (None on any failure: the
    caller keeps the old one). The sizes may only grow; a root may change only with the size, and
    then the consistency proof from the old root to the new one MUST verify (RFC 9162 §2.1.4.2)."""
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
    return _prove_extension(old, new, fetch, report)


def _prove_extension(
    old: Checkpoint, new: Checkpoint, fetch: ConsistencyFetch, report: Report
) -> tuple[Report, Checkpoint | None]:
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
