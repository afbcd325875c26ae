"""Time-ordered ids (``trustplane.ids``): UUIDv7 (RFC 9562 §5.7), unique, and in time order, so that
the indexes keyed by them (``policy_decisions``, the reference stores' trades and events) grow at
their right edge (``bench/decision_ids.py``). Event and decision ids keep the 32-hex-digit form
they always had (``trustplane.audit_events.new_event_id``); trade and trade event ids the canonical
36-character form."""

from __future__ import annotations

import time
import uuid

from trustplane.audit_events import AuditEvent, AuditEventType, new_event_id
from trustplane.ids import uuid7
from trustplane.reference.events import Envelope, EventSigner


def _millis(event_id: str) -> int:
    return int(event_id[:12], 16)


def test_an_event_id_is_a_uuid7_in_32_lowercase_hex_digits() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_event_id() for _ in range(64)]
    after = time.time_ns() // 1_000_000
    for event_id in ids:
        assert len(event_id) == 32
        assert event_id == event_id.lower()
        parsed = uuid.UUID(hex=event_id)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before <= _millis(event_id) <= after


def test_event_ids_follow_the_clock_and_never_repeat() -> None:
    ids = []
    for _ in range(5):
        ids.append(new_event_id())
        stamp = _millis(ids[-1])
        while time.time_ns() // 1_000_000 == stamp:  # the next millisecond
            time.sleep(0.0002)
    assert ids == sorted(ids)
    many = [new_event_id() for _ in range(20_000)]
    assert len(set(many)) == len(many)
    # 74 random bits after the milliseconds: ids of one millisecond differ in their tails
    same_ms = [i for i in many if _millis(i) == _millis(many[0])]
    assert len({i[12:] for i in same_ms}) == len(same_ms)


def test_an_audit_event_gets_a_time_ordered_id_by_default() -> None:
    first = AuditEvent(type=AuditEventType.TOKEN_ISSUED, issuer="https://as.example")
    time.sleep(0.002)
    second = AuditEvent(type=AuditEventType.TOKEN_ISSUED, issuer="https://as.example")
    assert uuid.UUID(hex=first.event_id).version == 7
    assert first.event_id < second.event_id
    assert abs(_millis(first.event_id) - first.time) <= 5


def test_a_trade_or_event_id_is_a_uuid7_in_its_canonical_form() -> None:
    first = uuid7()
    assert str(uuid.UUID(first)) == first  # 36 characters, lowercase, hyphenated
    assert uuid.UUID(first).version == 7
    time.sleep(0.002)
    assert first < uuid7()


def test_a_signed_trade_event_has_a_time_ordered_id() -> None:
    signer = EventSigner.generate("https://execution.example")
    envelope = Envelope("x", "s", "c")
    first, _ = signer.sign("trade.executed", "t-1", "execute", "executed", envelope)
    time.sleep(0.002)
    second, _ = signer.sign("trade.executed", "t-1", "execute", "executed", envelope)
    assert uuid.UUID(first).version == 7
    assert first < second
