"""The JSONL export format (docs/ledger.md, "Export format"): the writer, the fast reader and the
general reader, all three from the one template below.

A line carries what an auditor needs to check one RFC 9162 leaf offline: its index, the leaf hash
the log recorded (diagnostic only: it names an altered entry, the proof is the recomputed root or
the inclusion proof, RFC 9162 §2.1.3), the payload's salt, optionally the inclusion proof, the
payload bytes and the entry bytes, the entry last::

    {"index":7,"leaf_hash":"<b64>","salt":"<b64>"|null[,"inclusion_proof":["<b64>",...]],"payload":<bytes>|null,"entry":<bytes>}

The payload and the entry are embedded verbatim, as stored, so that verify hashes the very bytes
the log hashed; every line is still valid JSON. The fast reader does not parse a line: it checks the
template's markers at the offsets they imply and slices the values out (the common line's prefix,
up to its payload, in one regular-expression match built from the same markers). The leaf hash and
the salt have fixed lengths (the writer refuses others), so the quotes closing them stand at fixed
offsets; the payload ends at the one ENTRY marker after the salt. A line it cannot slice that way (another
shape, an older export, ENTRY inside the payload or the entry) is handed back whole, for a full JSON
parse. ``tests/audit/test_export_format.py`` checks, for generated entries and payloads, that
whatever the reader slices from a line the writer wrote is exactly what a full JSON parse gives.

A line the writer did not write (a shorter leaf hash or salt, a quote where the template has none)
may be sliced differently from a parse; the slices are then checked like any others and fail
(the recorded leaf only names an entry; a salt holding a quote is not base64): wrong slicing can
make an export fail, never pass, since the entry bytes must hash to the signed root and the payload
to the commitment inside them.
"""

from __future__ import annotations

import base64
import csv
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from trustplane.audit.canonical import SALT_BYTES

if TYPE_CHECKING:  # the offline verifier (`trustplane audit verify`) needs no database driver
    from trustplane.audit.store import StoredEntry


def _member(name: str) -> bytes:
    """The text that introduces a member after the first: ``,"name":``."""
    return b',"' + name.encode() + b'":'


# --------------------------------------------------------------------------- the template
# The line is these markers with the values between them, in this order.

#: Opens the line; the index (decimal digits) follows.
INDEX = b'{"index":'
#: The recorded leaf hash, a JSON string (its opening quote is part of the marker).
LEAF_HASH = _member("leaf_hash") + b'"'
#: Closes the leaf hash; the salt follows, a JSON string or ``null``.
SALT = b'"' + _member("salt")
#: The optional inclusion proof, an array of base64 strings (closed by ``]``).
INCLUSION_PROOF = _member("inclusion_proof") + b"["
#: The stored payload bytes, or ``null`` once purged.
PAYLOAD = _member("payload")
#: The stored entry bytes, up to the closing brace.
ENTRY = _member("entry")
CLOSE = b"}"
NULL = b"null"
#: A leaf hash is SHA-256 (RFC 9162 §2.1.1), a salt ``SALT_BYTES``: the writer refuses other
#: lengths, so the quote that closes each stands at a fixed offset.
LEAF_HASH_BYTES = 32
LEAF_HASH_B64 = len(base64.b64encode(bytes(LEAF_HASH_BYTES)))
SALT_B64 = len(base64.b64encode(bytes(SALT_BYTES)))

# --------------------------------------------------------------------------- offsets it implies
# ``c`` is where LEAF_HASH starts; everything up to the payload lies at a fixed offset from it.

#: Where the index digits start.
INDEX_AT = len(INDEX)
#: At most this many index digits are read without a parse (10**17 entries).
INDEX_DIGITS = 17
#: LEAF_HASH is searched for before this position.
LEAF_SEARCH_END = INDEX_AT + INDEX_DIGITS + len(LEAF_HASH)
#: The leaf hash's base64, ``c + LEAF_AT .. c + LEAF_END``.
LEAF_AT = len(LEAF_HASH)
LEAF_END = LEAF_AT + LEAF_HASH_B64
#: The salt's value (``"`` or ``n``), ``c + SALT_AT``.
SALT_AT = LEAF_END + len(SALT)
SALT_QUOTE = SALT + b'"'
QUOTE_PAYLOAD = b'"' + PAYLOAD
#: The common line up to its payload, matched in one call: the index digits, the leaf hash and the
#: salt (any bytes of their fixed lengths, as the offsets above would slice them).
_COMMON_PREFIX = re.compile(
    re.escape(INDEX)
    + b"([0-9]{1,%d})" % INDEX_DIGITS
    + re.escape(LEAF_HASH)
    + b"(.{%d})" % LEAF_HASH_B64
    + re.escape(SALT_QUOTE)
    + b"(.{%d})" % SALT_B64
    + re.escape(QUOTE_PAYLOAD),
    re.DOTALL,
)


# --------------------------------------------------------------------------- the writer


def export_line(item: StoredEntry, proof: Sequence[bytes] | None = None) -> bytes:
    """One line of a JSONL export, newline-terminated. ``proof``: the entry's inclusion proof
    (RFC 9162 §2.1.3 audit path), written in filtered exports. The stored entry and payload are
    compact JSON without a raw newline (RFC 8785 text and sorted-key ``orjson``), so the line is
    one line. ValueError for a leaf hash or salt of another length than the template's."""
    if len(item.leaf_hash) != LEAF_HASH_BYTES or (
        item.salt is not None and len(item.salt) != SALT_BYTES
    ):
        raise ValueError(
            f"entry {item.index}: a leaf hash is {LEAF_HASH_BYTES} bytes and a salt {SALT_BYTES}"
        )
    b64 = base64.b64encode
    salt = b'"' + b64(item.salt) + b'"' if item.salt is not None else NULL
    parts = [INDEX, str(item.index).encode(), LEAF_HASH, b64(item.leaf_hash), SALT, salt]
    if proof is not None:
        hashes = b'","'.join(b64(h) for h in proof)
        parts += [INCLUSION_PROOF, b'"' + hashes + b'"' if proof else b"", b"]"]
    payload = item.payload.encode() if item.payload is not None else NULL
    parts += [PAYLOAD, payload, ENTRY, item.entry.encode(), CLOSE, b"\n"]
    return b"".join(parts)


# --------------------------------------------------------------------------- the fast reader


@dataclass
class Columns:
    """A run of sliced lines, one list per field: index, entry bytes, recorded leaf hash (base64),
    salt (base64; None: purged), payload bytes (None: purged), and the inclusion proofs present,
    by position in the run (each a list of base64 hashes)."""

    index: list[int] = field(default_factory=list)
    entry: list[bytes] = field(default_factory=list)
    leaf: list[bytes | None] = field(default_factory=list)
    salt: list[bytes | None] = field(default_factory=list)
    payload: list[bytes | None] = field(default_factory=list)
    proofs: dict[int, list[Any]] = field(default_factory=dict)


def read_runs(lines: Iterable[bytes], *, terminated: bool = False) -> Iterator[Columns | bytes]:
    """The lines in order, as runs of sliced lines (:class:`Columns`) and, between them, each line
    the template does not slice unambiguously, whole (the caller parses it). Empty lines are
    skipped. ``terminated``: every line ends with its newline (as a file's ``readlines`` gives
    them), which is not part of the line. Written for throughput: one pass, no parse, one match and
    one split for the common line."""
    run = Columns()
    index, entry, leaf, salt, payload, proofs = _lists(run)
    # Locals, not module constants, in the loop: this runs for every line of an export.
    common, null, entry_marker = _COMMON_PREFIX.match, NULL, ENTRY
    close = CLOSE + b"\n" if terminated else CLOSE
    last = -len(close)  # where the closing brace is, from the end
    for line in lines:
        # the common line first: a 16-byte salt, no proof
        if (found := common(line)) is not None and line[last:] == close:
            # ENTRY once after the salt: else one of them is a member inside the payload or entry
            rest = line[found.end() : last].split(entry_marker)
            if len(rest) == 2:
                digits, recorded, salted = found.groups()
                index.append(int(digits))
                entry.append(rest[1])
                leaf.append(recorded)
                salt.append(salted)
                payload.append(None if rest[0] == null else rest[0])
                continue
        if terminated:
            line = line[:-1] if line[-1:] == b"\n" else line
        c = line.find(LEAF_HASH, INDEX_AT, LEAF_SEARCH_END)
        sliced = _slice_other(line, c) if line else None
        if sliced is None:
            if line.strip():
                if index:
                    yield run
                yield line
                run = Columns()
                index, entry, leaf, salt, payload, proofs = _lists(run)
            continue
        if sliced[4] is not None:
            proofs[len(index)] = sliced[4]
        index.append(sliced[0])
        entry.append(sliced[1])
        leaf.append(line[c + LEAF_AT : c + LEAF_END])
        salt.append(sliced[2])
        payload.append(sliced[3])
    if index:
        yield run


_Sliced = tuple[int, bytes, bytes | None, bytes | None, list[bytes] | None]


def _slice_other(line: bytes, c: int) -> _Sliced | None:
    """A line of the template with a purged or other-length salt, or an inclusion proof:
    (index, entry, salt, payload, proof), or None if the template does not slice it."""
    digits = line[INDEX_AT:c]
    s = c + SALT_AT
    if (
        c < INDEX_AT
        or line[:INDEX_AT] != INDEX
        or not digits.isdigit()
        or line[c + LEAF_END : s] != SALT
        or line[-1:] != CLOSE
        or b'"' in line[c + LEAF_AT : c + LEAF_END]
    ):
        return None
    salt: bytes | None = None
    if line[s : s + 1] == b'"':
        e = line.find(b'"', s + 1)
        salt, s = line[s + 1 : e], e + 1
    elif line[s : s + len(NULL)] == NULL:
        s += len(NULL)
    else:
        return None
    proof: list[bytes] | None = None
    if line[s : s + len(INCLUSION_PROOF)] == INCLUSION_PROOF:
        e = line.find(b"]", s)
        inner = line[s + len(INCLUSION_PROOF) : e]
        proof, s = inner[1:-1].split(b'","') if inner else [], e + 1
    if line[s : s + len(PAYLOAD)] != PAYLOAD:
        return None
    rest = line[s + len(PAYLOAD) : -1].split(ENTRY)
    if len(rest) != 2:
        return None
    return int(digits), rest[1], salt, None if rest[0] == NULL else rest[0], proof


def _lists(
    run: Columns,
) -> tuple[
    list[int],
    list[bytes],
    list[bytes | None],
    list[bytes | None],
    list[bytes | None],
    dict[int, Any],
]:
    return run.index, run.entry, run.leaf, run.salt, run.payload, run.proofs


# --------------------------------------------------------------------------- the general reader


def read_export(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL or CSV export (by the file's first byte), in file order, as dicts, each
    line parsed. The slow, general reader (CSV for people, tests); verify reads JSONL through
    :func:`read_runs`, keeping the entry and payload bytes verbatim."""
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
                "entry": row["entry"],
                "leaf_hash": row["leaf_hash"] or None,
                "payload_json": row["payload"] or None,
                "salt": row["salt"] or None,
                "inclusion_proof": row["inclusion_proof"].split()
                if row.get("inclusion_proof")
                else None,
            }


def payload_bytes(record: dict[str, Any]) -> bytes | None:
    """The payload bytes the commitment covers, from a parsed record (the export keeps them
    canonical: sorted keys)."""
    if record.get("payload_json") is not None:
        return str(record["payload_json"]).encode()
    if record.get("payload") is None:
        return None
    return orjson.dumps(record["payload"], option=orjson.OPT_SORT_KEYS)
