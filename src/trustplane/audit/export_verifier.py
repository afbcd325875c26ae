"""The checks of an export against a signed checkpoint, trusting nothing the server says.

- Every leaf hash is recomputed from the entry bytes as exported (RFC 9162 §2.1.1: SHA-256 of
  0x00 || entry); the hash the line records only names an altered entry.
- A complete export (indices 0..size-1) MUST fold to the checkpoint's root (RFC 9162 §2.1.1 Merkle
  Tree Hash, computed here as a stream of aligned perfect subtrees); otherwise each entry MUST carry
  an inclusion proof that verifies against that root (§2.1.3.2).
- Each payload MUST hash, with its salt, to the ``payload_hash`` committed inside the entry bytes.
- The checkpoint itself is opened by :func:`trustplane.audit.report.open_signed` (C2SP signed-note
  and tlog-checkpoint).

Written for throughput (issue 4: >= 200k leaves/s): lines are sliced, not parsed
(:mod:`trustplane.audit.export_format`); each check runs as one comprehension over a run of
entries; the tree is folded from aligned perfect blocks of leaves, level by level.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from trustplane.audit import merkle
from trustplane.audit.canonical import EntryError, canonical_bytes
from trustplane.audit.export_format import Columns, payload_bytes, read_runs
from trustplane.audit.note import Checkpoint
from trustplane.audit.report import Report, open_signed
from trustplane.audit_events import AuditEventType

_sha256 = hashlib.sha256

#: The commitment inside an entry: ``"payload_hash":"<64 hex digits>"`` (see ``canonical.py``).
PAYLOAD_HASH = b'"payload_hash":"'
HASH_AT = len(PAYLOAD_HASH)
HASH_END = HASH_AT + 2 * _sha256().digest_size


def committed_payload_hash(entry: bytes) -> bytes | None:
    """The ``payload_hash`` member of an entry (hex, as bytes), or None.

    Fast path without a parse: the member is found by its text when no ``{`` precedes it (so it is a
    key of the top-level object, not of a nested one), it occurs once, and its value is 64 ASCII
    letters and digits (so its text is its value); anything else (a ``{`` inside an earlier string,
    an escape in the value) falls back to a full JSON parse, which decides."""
    at = entry.find(PAYLOAD_HASH)
    if (
        at > 0
        and entry.find(b"{", 1, at) < 0
        and entry[at + HASH_END : at + HASH_END + 1] == b'"'
        and entry.find(PAYLOAD_HASH, at + HASH_END) < 0
        and (value := entry[at + HASH_AT : at + HASH_END]).isalnum()
    ):
        return value
    try:
        parsed = orjson.loads(entry).get("payload_hash")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return parsed.encode() if isinstance(parsed, str) else None


# Hashing in bulk: each hash starts from a copy of a context that already holds its prefix (0x00
# for a leaf, 0x01 for a node), which skips creating and initialising a context and the prefix
# concatenation (about 10% of the hashing time of a leaf).
_LEAF_PREFIX = _sha256(b"\x00")
_NODE_PREFIX = _sha256(b"\x01")


def _leaf_hashes(entries: list[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.1 leaf hashes, SHA-256(0x00 || entry), of each entry."""
    out: list[bytes] = []
    add, new = out.append, _LEAF_PREFIX.copy
    for entry in entries:
        h = new()
        h.update(entry)
        add(h.digest())
    return out


def _parent_hashes(level: list[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.1 SHA-256(0x01 || left || right) of each pair of an even-length level."""
    out: list[bytes] = []
    add, new, pairs = out.append, _NODE_PREFIX.copy, iter(level)
    for left, right in zip(pairs, pairs, strict=False):
        h = new()
        h.update(left + right)
        add(h.digest())
    return out


def _same_base64(recorded: list[bytes | None], hashes: list[bytes]) -> bool:
    """Whether each recorded (base64) leaf hash is the computed one: one comparison of the joined
    texts (every recorded hash of a run but a lone record's is the template's 44 bytes, so the
    texts line up)."""
    try:
        return b"\n".join(recorded) + b"\n" == b"".join(map(binascii.b2a_base64, hashes))  # type: ignore[arg-type]
    except TypeError:  # one is None: compared one by one
        return False


def _commitments_match(entries: list[bytes], salts: list[Any], payloads: list[Any]) -> bool:
    """Whether every payload hashes, with its salt, to the commitment in its entry, all checked
    at once; False if any does not or cannot be read this way (the caller then checks each).

    The commitment is found by its text (``committed_payload_hash``'s fast path): once, no ``{``
    before it, and the 64 characters after it followed by ``"``; these 65 bytes of every entry,
    joined, must equal the computed hex digests each followed by ``"`` (so each value is 64
    letters and digits: its text is its value)."""
    marker, at_value, end_value = PAYLOAD_HASH, HASH_AT, HASH_END
    sha, a2b = _sha256, binascii.a2b_base64
    try:
        values = [
            e[at + at_value : at + end_value + 1]  # the value and the character after it
            if (at := e.find(marker)) > 0
            and e.find(b"{", 1, at) < 0
            and e.find(marker, at + end_value) < 0
            else b""
            for e in entries
        ]
        computed = [
            sha(a2b(s, strict_mode=True) + p).hexdigest()
            for s, p in zip(salts, payloads, strict=True)
        ]
    except (binascii.Error, TypeError, ValueError):
        return False
    return b"".join(values) == ('"'.join(computed) + '"').encode()


def _b64(value: Any) -> bytes:
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError("not base64") from None


def _safe_b64(value: Any) -> bytes | None:
    try:
        return _b64(value)
    except ValueError:
        return None


def _commitment(salt: Any, payload: bytes | None) -> bytes | None:
    key = _safe_b64(salt)
    if payload is None or key is None:
        return None
    return _sha256(key + payload).hexdigest().encode()


#: The bytes only a quarantine placeholder's canonical entry holds (in a string value every ``"``
#: is escaped: no other field can contain them).
_PLACEHOLDER = b'"type":"' + AuditEventType.AUDIT_ENTRY_QUARANTINED.value.encode() + b'"'


class ExportVerifier:
    """Feed entries in export order (:meth:`add` for dict records, :meth:`scan` for JSONL lines);
    :meth:`finish` returns the report."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        report: Report,
        *,
        part: bool = False,
        check_canonical: bool = False,
    ) -> None:
        """``part``: one byte range of a file verified in parallel; its indices start wherever its
        first record says, and it keeps the aligned perfect subtrees of its leaves for the parent to
        fold into the root. ``check_canonical``: also re-serialise every entry (RFC 8785) and
        require the bytes to be identical (about 2 us more per entry)."""
        self.cp, self.report = checkpoint, report
        #: Aligned perfect subtrees of the contiguous leaves so far, left to right (level, hash).
        self.levels: list[int] = []
        self.hashes: list[bytes] = []
        #: The entries so far continue the sequence without a gap (from 0, or from ``first``).
        self.contiguous = True
        self._expected = -1 if part else 0
        self.check_canonical = check_canonical
        self.first: int | None = None
        self.count = self.proofs = self.payloads = self.purged = self.unproved = 0
        #: Quarantine placeholders among the entries (docs/ledger.md, "Quarantine").
        self.placeholders = 0
        self._seen: set[int] = set()

    def add(self, record: dict[str, Any]) -> None:
        """One record as a dict (CSV rows, API answers, JSONL lines of another shape). An entry given
        as text is hashed as it is; an entry given as an object is hashed in its RFC 8785 form."""
        index = record.get("index")
        if type(index) is not int or index < 0:
            self.report.fail(f"record {self.count}: no valid index")
            self.contiguous = False
            return
        entry = record.get("entry")
        if isinstance(entry, str):
            data = entry.encode()
        else:
            try:
                data = canonical_bytes(entry)  # type: ignore[arg-type]
            except (AttributeError, TypeError, EntryError):
                self.count += 1
                self.contiguous = False
                self.report.fail(f"entry {index}: not a valid canonical envelope", index)
                return
        recorded, salt, proof = (
            record.get("leaf_hash"),
            record.get("salt"),
            record.get("inclusion_proof"),
        )
        cols = Columns()
        cols.index.append(index)
        cols.entry.append(data)
        cols.leaf.append(recorded.encode() if isinstance(recorded, str) else recorded)
        cols.salt.append(salt.encode() if isinstance(salt, str) else salt)
        cols.payload.append(payload_bytes(record))
        if proof is not None:
            cols.proofs[0] = list(proof)
        self.check(cols)

    def scan(self, lines: Iterable[bytes], *, terminated: bool = False) -> None:
        """JSONL export lines (``terminated``: each ends with its newline, see
        :func:`~trustplane.audit.export_format.read_runs`): the runs the template slices are checked
        as read; a line of another shape (an older export) is parsed and handed to :meth:`add`."""
        for run in read_runs(lines, terminated=terminated):
            if isinstance(run, Columns):
                self.check(run)
            else:
                self.add(orjson.loads(run))

    def check(self, cols: Columns) -> None:
        """Every check of a run of entries, on their bytes as read, column by column (one C-level
        pass per check over the run: this runs over every leaf of a full export)."""
        n = len(cols.index)
        if not n:
            return
        if self.first is None:
            self.first = cols.index[0]
            if self._expected < 0:
                self._expected = cols.index[0]
        start = self._expected
        run = self._follow_sequence(cols.index)
        leaves = _leaf_hashes(cols.entry)
        self.placeholders += sum(_PLACEHOLDER in e for e in cols.entry)
        if not _same_base64(cols.leaf, leaves):
            for at, recorded, h in zip(cols.index, cols.leaf, leaves, strict=True):
                if recorded is not None and _safe_b64(recorded) != h:
                    self.report.fail(
                        f"entry {at}: its content does not hash to the leaf recorded for index "
                        f"{at} (the entry was altered or moved)",
                        at,
                    )
        if self.check_canonical:
            for at, entry in zip(cols.index, cols.entry, strict=True):
                self._check_canonical(at, entry)
        for i, proof in cols.proofs.items():
            self._check_proof(cols.index[i], leaves[i], proof)
        self.unproved += n - len(cols.proofs)
        if run:
            self._push_leaves(start, leaves[:run] if run < n else leaves)
        self._check_payloads(cols)
        self.count += n

    def _follow_sequence(self, index: list[int]) -> int:
        """How many leading entries of the run continue the sequence without a gap (their leaves
        go into the root); a duplicate or a step back is a failure."""
        start, n = self._expected, len(index)
        if index[-1] == start + n - 1 and index == list(range(start, start + n)):
            self._expected = start + n
            return n
        run = 0
        for i, at in enumerate(index):
            if at != self._expected:
                if self.contiguous:
                    run = i
                self.contiguous = False
                if at in self._seen or at < self._expected:
                    self.report.fail(f"entry {at} appears out of order or twice in the export", at)
                self._seen.add(at)
            self._expected = at + 1
        return n if self.contiguous else run

    def _check_payloads(self, cols: Columns) -> None:
        payloads, salts = cols.payload, cols.salt
        purged = payloads.count(None)
        self.purged += purged
        if not purged and _commitments_match(cols.entry, salts, payloads):
            self.payloads += len(payloads)
            return
        committed = [committed_payload_hash(e) for e in cols.entry]
        computed = [_commitment(s, p) for s, p in zip(salts, payloads, strict=True)]
        for at, salt, payload, mine, theirs in zip(
            cols.index, salts, payloads, computed, committed, strict=True
        ):
            if payload is None:
                continue
            if _safe_b64(salt) is None:
                self.report.fail(f"entry {at}: payload salt is not base64", at)
            elif mine is not None and mine == theirs:
                self.payloads += 1
            else:
                self.report.fail(f"entry {at}: payload does not match its committed hash", at)

    def _push_leaves(self, start: int, leaves: list[bytes]) -> None:
        """Leaf hashes ``start, start + 1, ...`` onto the stack: each aligned perfect block of them
        is hashed level by level (RFC 9162 §2.1.1: 0x01 || left || right), then pushed as one
        subtree."""
        position, i, n = start, 0, len(leaves)
        while i < n:
            level = min(((position & -position) or 1 << 62).bit_length(), (n - i).bit_length()) - 1
            block = leaves[i : i + (1 << level)]
            for _ in range(level):
                block = _parent_hashes(block)
            position += 1 << level
            i += 1 << level
            self.push_subtree(position, level, block[0])

    def _check_canonical(self, index: int, entry: bytes) -> None:
        try:
            canonical = canonical_bytes(orjson.loads(entry))
        except (orjson.JSONDecodeError, AttributeError, TypeError, EntryError):
            canonical = b""
        if canonical != entry:
            self.report.fail(f"entry {index}: not in RFC 8785 canonical form", index)

    def push_subtree(self, end: int, level: int, h: bytes) -> None:
        """Push the perfect subtree of ``2**level`` leaves ending at leaf index ``end`` (exclusive),
        merging it with its left sibling while that is on the stack (streaming MTH)."""
        levels, hashes, c = self.levels, self.hashes, end >> level
        while not c & 1 and levels and levels[-1] == level:
            h = _sha256(b"\x01" + hashes.pop() + h).digest()
            levels.pop()
            level += 1
            c >>= 1
        levels.append(level)
        hashes.append(h)

    def _check_proof(self, index: int, leaf: bytes, proof: list[Any]) -> None:
        """RFC 9162 §2.1.3.2: the audit path MUST lead from the leaf to the signed root."""
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

    def finish(self) -> Report:
        r, cp = self.report, self.cp
        full = self.contiguous and self.count == cp.size
        if full:
            size = self.count
            root = merkle.fold(self.hashes) if self.hashes else merkle.EMPTY_ROOT
            if root == cp.root:
                r.proved.append(
                    f"the export's {size} entries are exactly the log at tree size {size}: "
                    "recomputed root equals the signed root (no entry altered, dropped, added or "
                    "reordered)"
                )
            else:
                r.fail("the root recomputed from the export differs from the signed root")
        elif self.count and self.contiguous and self.count < cp.size:
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
        if self.placeholders:
            r.not_proved.append(
                f"{self.placeholders} entries are quarantine placeholders "
                f"({AuditEventType.AUDIT_ENTRY_QUARANTINED.value}): each stands for a pending entry "
                "the log could not integrate, named by its SHA-256 (reason_ids entry_sha256); the "
                "entry itself is in the deployment's audit_quarantine table, outside the log "
                "(docs/ledger.md, Quarantine)"
            )
        if self.check_canonical:
            r.proved.append("every entry is in RFC 8785 canonical form")
        r.not_proved.append(
            "that the log showed everyone this same checkpoint (split view): run `trustplane audit "
            "monitor` from independent places or compare checkpoints"
        )
        r.not_proved.append("entries appended after this checkpoint")
        return r


def verify_export(
    records: Iterable[dict[str, Any]],
    checkpoint_note: str,
    verifier_key: str,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Verify records given as dicts (see :meth:`ExportVerifier.add`)."""
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
