"""Identifiers in time order: UUIDv7 (RFC 9562 §5.7).

48 bits of Unix milliseconds first, then the version and variant bits and 74 random bits
(``os.urandom``): unique and unguessable like a random UUID, and increasing with time, so that an
index keyed by them grows at its right edge instead of taking every insert on a random page. For
tables that keep their rows (the ledger's ``policy_decisions`` for 90 days, the reference stores'
trades, transitions and events for ever) a random key means, once the index outgrows the buffers,
a page read per insert and, after every checkpoint, an 8 KB full-page image in the WAL
(``bench/decision_ids.py``, docs/scaling.md).
"""

from __future__ import annotations

import os
import time


def uuid7_hex() -> str:
    """A new UUIDv7 as 32 lowercase hex digits (event and policy decision ids)."""
    raw = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big"))
    raw += os.urandom(10)
    raw[6] = 0x70 | raw[6] & 0x0F  # version 7, then rand_a
    raw[8] = 0x80 | raw[8] & 0x3F  # variant 0b10, then rand_b
    return raw.hex()


def uuid7() -> str:
    """A new UUIDv7 in its canonical 36-character form (trade and trade event ids)."""
    h = uuid7_hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
