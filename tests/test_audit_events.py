"""Event and decision ids (``trustplane.audit_events.new_event_id``): UUIDv7 (RFC 9562 §5.7) in the
32-hex-digit form ids always had, unique, and in time order, so that the indexes keyed by them
(``policy_decisions``) grow at their right edge (``bench/decision_ids.py``)."""

from __future__ import annotations

import time
import uuid

from trustplane.audit_events import AuditEvent, AuditEventType, new_event_id


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
