"""The entry's canonical form is RFC 8785 (JCS): byte equality with the independent ``rfc8785``
implementation over generated envelopes (unicode, control characters, large integers)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from trustplane.audit.canonical import (
    MAX_SAFE_INTEGER,
    EntryError,
    canonical_bytes,
    commit_payload,
    entry_parts,
    payload_matches,
)
from trustplane.audit_events import AuditEvent, AuditEventType

#: Any Unicode scalar value (no lone surrogates: they are not Unicode and JCS refuses them).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
OPT_TEXT = st.none() | TEXT
SAFE_INT = st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
TEXTS = st.lists(TEXT, max_size=4).map(tuple)

events = st.builds(
    AuditEvent,
    type=st.sampled_from(list(AuditEventType)),
    issuer=TEXT,
    subject=OPT_TEXT,
    client_id=OPT_TEXT,
    actor_chain=TEXTS,
    partner=OPT_TEXT,
    audience=OPT_TEXT,
    scopes=TEXTS,
    authorization_details_digest=OPT_TEXT,
    mandate_id=OPT_TEXT,
    mandate_version=st.none() | SAFE_INT,
    transaction_id=OPT_TEXT,
    correlation_id=OPT_TEXT,
    jti=OPT_TEXT,
    decision=OPT_TEXT,
    reason=OPT_TEXT,
    reason_ids=TEXTS,
    policy_bundle_version=OPT_TEXT,
    service=TEXT,
    region=OPT_TEXT,
    purpose=OPT_TEXT,
    payload=st.dictionaries(TEXT, TEXT | SAFE_INT, max_size=3),
    time=SAFE_INT,
)


@given(events)
@settings(max_examples=500)
def test_entries_are_byte_equal_to_rfc8785(event: AuditEvent) -> None:
    entry, payload, salt = entry_parts(event)
    body = orjson.loads(entry)
    assert entry == rfc8785.dumps(body)
    assert payload_matches(body, payload, salt)


@given(st.dictionaries(st.sampled_from(["time", "mandate_version"]), SAFE_INT, min_size=1))
def test_safe_integers_at_the_edges(values: dict[str, Any]) -> None:
    envelope = {"type": "a:b:c", **values}
    assert canonical_bytes(envelope) == rfc8785.dumps(envelope)


@pytest.mark.parametrize("value", [MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER - 1, 2**64, 1.5, True])
def test_integers_outside_the_jcs_domain_are_refused_like_the_reference(value: Any) -> None:
    with pytest.raises(EntryError):
        canonical_bytes({"time": value})
    if isinstance(value, int) and not isinstance(value, bool):
        with pytest.raises(rfc8785.IntegerDomainError):
            rfc8785.dumps({"time": value})


def test_every_control_character_and_edge_code_point() -> None:
    text = "".join(chr(c) for c in range(0x80)) + "\u2028\u2029\ufeff\U0001f600\U0010ffff\ue000"
    envelope = {"subject": text, "z": "", "a": [text]}
    assert canonical_bytes(envelope) == rfc8785.dumps(envelope)


def test_a_lone_surrogate_from_caller_input_is_recorded_replaced() -> None:
    entry = canonical_bytes({"audience": "x\ud800y"})
    assert orjson.loads(entry) == {"audience": "x\ufffdy"}


def test_each_entry_gets_its_own_salt() -> None:
    event = AuditEvent(type=AuditEventType.TOKEN_ISSUED, issuer="i", payload={"e": "alice@example"})
    (e1, p1, s1), (e2, p2, s2) = entry_parts(event), entry_parts(event)
    assert p1 == p2
    assert s1 != s2
    assert e1 != e2
    assert b"alice" not in e1


@given(events)
@settings(max_examples=300)
def test_the_entry_is_the_canonical_form_of_the_events_dict(event: AuditEvent) -> None:
    """``entry_parts`` reads the event's fields directly; its bytes are those of the plain dict
    envelope (``to_dict`` with the payload replaced by its commitment), so old entries and new ones
    are built the same way."""
    salt = bytes(range(16))
    envelope = event.to_dict()
    payload, envelope["payload_hash"] = commit_payload(envelope.pop("payload"), salt)
    assert entry_parts(event, salt) == (canonical_bytes(envelope), payload, salt)


def test_an_event_time_outside_the_jcs_domain_is_refused() -> None:
    event = AuditEvent(type=AuditEventType.TOKEN_ISSUED, issuer="i", time=MAX_SAFE_INTEGER + 1)
    with pytest.raises(EntryError):
        entry_parts(event)


def test_a_lone_surrogate_in_an_event_is_recorded_replaced() -> None:
    event = AuditEvent(
        type=AuditEventType.TOKEN_ISSUED, issuer="i", subject="a\udc00", scopes=("\ud800",)
    )
    body = orjson.loads(entry_parts(event)[0])
    assert (body["subject"], body["scopes"], body["type"]) == (
        "a\ufffd",
        ["\ufffd"],
        "oauth:token:issued",
    )
