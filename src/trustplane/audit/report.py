"""What a verification proved, what it did not, and what failed (naming the index), so that an
auditor never reads "OK" as more than it is; and the first line of every report, the checkpoint's
signature (C2SP signed-note over a C2SP tlog-checkpoint body, checked with the key the auditor holds,
never one the server hands over)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from trustplane.audit.note import Checkpoint, NoteError, Verifier, open_checkpoint

MAX_FAILURES_LISTED = 50
MORE_FAILURES = "... more failures not listed"


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
            self.failures.append(MORE_FAILURES)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "proved": self.proved,
            "not_proved": self.not_proved,
            "failures": self.failures,
            "failed_indices": self.failed_indices,
        }


def open_signed(checkpoint_note: str, verifier_key: str, report: Report) -> Checkpoint | None:
    """The checkpoint, if ``checkpoint_note`` carries a valid signature by ``verifier_key`` (C2SP
    signed-note, Ed25519) and its body is a C2SP tlog-checkpoint; else None, the reason failed in
    ``report``."""
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
