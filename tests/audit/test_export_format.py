"""The export line's fast reader against a full JSON parse: for any entry and payload the format
admits (any JSON, unicode, escapes, integers beyond 64 bits, nesting, the template's own markers
inside values), whatever the reader slices is exactly what ``json.loads`` of the line gives, and
the bytes it slices are the bytes the writer embedded. A line it cannot slice unambiguously is handed
back whole, for the verifier's full parse."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trustplane.audit.export_format import ENTRY, Columns, export_line, read_runs
from trustplane.audit.export_verifier import ExportVerifier, committed_payload_hash
from trustplane.audit.note import Checkpoint
from trustplane.audit.report import Report
from trustplane.audit.store import StoredEntry

#: Text the reader looks for, placed inside keys and strings where a careless slice would cut.
MARKERS = [
    ',"entry":',
    '","payload":',
    '","salt":"',
    ',"leaf_hash":"',
    ',"inclusion_proof":[',
    '"payload_hash":"',
    "entry",
    "payload_hash",
    '"',
    "\\",
    "{",
    "}",
    "\n",
    "\u2028",
    "\x00",
    "\U0001f600",
]
strings = st.text() | st.sampled_from(MARKERS) | st.lists(st.sampled_from(MARKERS)).map("".join)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**64 - 2, max_value=2**64 + 2)
    | st.floats(allow_nan=False, allow_infinity=False)
    | strings
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(strings, children, max_size=4)
    ),
    max_leaves=10,
)
objects = st.dictionaries(strings, json_values, max_size=6)


def compact(value: Any) -> bytes:
    """JSON without insignificant whitespace, unicode unescaped: how entries and payloads are stored."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@st.composite
def stored_entries(draw: st.DrawFn) -> tuple[StoredEntry, list[bytes] | None]:
    payload = draw(st.none() | json_values.map(compact))
    item = StoredEntry(
        index=draw(st.integers(0, 10**17 - 1) | st.integers(min_value=0)),
        entry=compact(draw(objects)).decode(),
        leaf_hash=draw(st.binary(min_size=32, max_size=32)),
        payload=payload.decode() if payload is not None else None,
        salt=draw(st.none() | st.binary(min_size=16, max_size=16)),
    )
    proof = draw(st.none() | st.lists(st.binary(min_size=32, max_size=32), max_size=5))
    return item, proof


def as_parsed(run: Columns) -> dict[str, Any]:
    """One sliced line as ``json.loads`` would give it, members in the template's order."""
    (index,), (entry,), (leaf,), (salt,), (payload,) = (
        run.index,
        run.entry,
        run.leaf,
        run.salt,
        run.payload,
    )
    assert leaf is not None
    out: dict[str, Any] = {
        "index": index,
        "leaf_hash": leaf.decode(),
        "salt": salt.decode() if salt is not None else None,
    }
    if run.proofs:
        out["inclusion_proof"] = [h.decode() for h in run.proofs[0]]
    out["payload"] = json.loads(payload) if payload is not None else None
    out["entry"] = json.loads(entry)
    return out


#: A member named like the marker inside the entry: the last ``,"entry":`` is not the separator.
NESTED_ENTRY = (StoredEntry(3, '{"a":1,"entry":2}', bytes(32), "{}", bytes(16)), None)
#: ... inside the payload: the first ``,"entry":`` after the salt is not the separator.
PAYLOAD_ENTRY = (StoredEntry(4, '{"b":1}', bytes(32), '{"a":1,"entry":2}', bytes(16)), None)
#: ... in both.
BOTH_ENTRY = (StoredEntry(5, '{"a":1,"entry":2}', bytes(32), '{"a":1,"entry":2}', bytes(16)), None)


@given(stored_entries())
@example(NESTED_ENTRY)
@example(PAYLOAD_ENTRY)
@example(BOTH_ENTRY)
@settings(max_examples=200, deadline=None)
def test_what_the_fast_reader_slices_is_what_a_json_parse_gives(
    case: tuple[StoredEntry, list[bytes] | None],
) -> None:
    item, proof = case
    line = export_line(item, proof).rstrip(b"\n")
    parsed = json.loads(line)
    (got,) = read_runs([line])
    assert list(read_runs([line + b"\n"], terminated=True)) == [got]  # as a file gives the line
    unambiguous = (
        item.index < 10**17
        and ENTRY not in item.entry.encode()
        and ENTRY not in (item.payload or "").encode()
    )
    if isinstance(got, bytes):  # handed back whole, for the full parse
        assert got == line
        assert not unambiguous, "a line the writer wrote with nothing ambiguous was not sliced"
        return
    sliced = as_parsed(got)
    assert sliced == parsed
    assert list(sliced) == list(parsed)
    assert got.entry == [item.entry.encode()]
    if item.payload is not None and item.payload != "null":
        assert got.payload == [item.payload.encode()]


@given(st.lists(stored_entries(), max_size=5))
@settings(max_examples=40, deadline=None)
def test_runs_keep_every_line_in_order(
    cases: list[tuple[StoredEntry, list[bytes] | None]],
) -> None:
    """Sliced runs and lines handed back alternate in file order; blank lines are skipped."""
    lines = [export_line(item, proof).rstrip(b"\n") for item, proof in cases]
    got = list(read_runs([b"", *(x for line in lines for x in (line, b""))]))
    assert list(read_runs([b"\n", *(x + b"\n" for x in lines)], terminated=True)) == got
    indices = [
        index
        for part in got
        for index in (part.index if isinstance(part, Columns) else [json.loads(part)["index"]])
    ]
    assert indices == [item.index for item, _ in cases]
    runs = [isinstance(part, Columns) for part in got]
    assert not any(a and b for a, b in itertools.pairwise(runs)), "two runs without a line between"


hex_digests = st.text("0123456789abcdef", min_size=64, max_size=64)


@given(objects, st.none() | hex_digests | strings, st.integers(0, 6))
@settings(max_examples=150, deadline=None)
def test_the_committed_payload_hash_is_what_a_json_parse_gives(
    entry: dict[str, Any], committed: str | None, position: int
) -> None:
    """The commitment read from an entry's text is the ``payload_hash`` member a parse finds,
    wherever it stands and whatever precedes it."""
    if committed is not None:
        members = list(entry.items())
        members.insert(min(position, len(members)), ("payload_hash", committed))
        entry = dict(members)
    data = compact(entry)
    try:
        value = json.loads(data).get("payload_hash")
    except ValueError:
        return
    expected = value.encode() if isinstance(value, str) else None
    if any(abs(v) >= 2**63 for v in _integers(entry)):
        return  # orjson refuses them, and no entry holds one (canonical.py: within 2**53)
    assert committed_payload_hash(data) == expected


SALT, PAYLOAD = b"0123456789abcdef", b'{"grant_type":"client_credentials"}'
COMMITMENT = hashlib.sha256(SALT + PAYLOAD).hexdigest()


def payload_proved(entry: bytes) -> bool:
    """Whether the verifier counts the payload of one entry as matching its commitment."""
    verifier = ExportVerifier(Checkpoint("test", 1, bytes(32)), Report())
    run = Columns([0], [entry], [None], [base64.b64encode(SALT)], [PAYLOAD])
    verifier.check(run)
    return verifier.payloads == 1


@given(objects, st.sampled_from([COMMITMENT, "0" * 64, COMMITMENT.upper()]), st.integers(0, 6))
@settings(max_examples=150, deadline=None)
def test_a_payload_is_proved_exactly_when_a_parse_finds_its_commitment(
    entry: dict[str, Any], committed: str, position: int
) -> None:
    """The check of a whole run at once (the commitments read by their text) proves a payload
    exactly when the ``payload_hash`` member a parse finds is the salted hash of the payload."""
    members = list(entry.items())
    members.insert(min(position, len(members)), ("payload_hash", committed))
    data = compact(dict(members))
    if any(abs(v) >= 2**63 for v in _integers(entry)):
        return  # orjson refuses them, and no entry holds one (canonical.py: within 2**53)
    assert payload_proved(data) == (json.loads(data).get("payload_hash") == COMMITMENT)


@pytest.mark.parametrize(
    "entry",
    [
        # the marker again right after the value: not JSON, so no commitment is found
        b'{"payload_hash":"' + COMMITMENT.encode() + b'"payload_hash":"x"}',
        b'{"payload_hash":"' + COMMITMENT.encode() + b'","payload_hash":"x"}',
        b'{"a":{"payload_hash":"' + COMMITMENT.encode() + b'"}}',
        b'{"payload_hash":"' + COMMITMENT.encode() + b'0"}',
        b'{"payload_hash":"' + COMMITMENT.encode()[:-1] + b'"}',
    ],
    ids=["marker-after-value", "member-twice", "nested", "value-longer", "value-shorter"],
)
def test_a_commitment_a_parse_does_not_find_proves_nothing(entry: bytes) -> None:
    assert not payload_proved(entry)
    assert payload_proved(b'{"payload_hash":"' + COMMITMENT.encode() + b'"}')


def _integers(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        return [i for v in value.values() for i in _integers(v)]
    if isinstance(value, list):
        return [i for v in value for i in _integers(v)]
    return []


@pytest.mark.parametrize(
    ("leaf_hash", "salt"), [(bytes(31), bytes(16)), (bytes(32), bytes(15)), (bytes(32), b"")]
)
def test_the_writer_refuses_what_the_template_has_no_room_for(
    leaf_hash: bytes, salt: bytes
) -> None:
    """A shorter salt or hash would move the quote the reader expects at a fixed offset."""
    with pytest.raises(ValueError, match="a leaf hash is 32 bytes and a salt 16"):
        export_line(StoredEntry(0, "{}", leaf_hash, "{}", salt))
