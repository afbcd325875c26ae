"""Identifiers in time order: UUIDv7 (RFC 9562 §5.7), and our tokens' ``jti`` and ``txn``.

48 bits of Unix milliseconds first, then the version and variant bits and 74 random bits
(``os.urandom``): unique and unguessable like a random UUID, and increasing with time, so that an
index keyed by them grows at its right edge instead of taking every insert on a random page. For
tables that keep their rows (the ledger's ``policy_decisions`` for 90 days, the reference stores'
trades, transitions and events for ever) a random key means, once the index outgrows the buffers,
a page read per insert and, after every checkpoint, an 8 KB full-page image in the WAL
(``bench/decision_ids.py``, docs/scaling.md).
"""

from __future__ import annotations

import binascii
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


#: Base64's alphabet (``binascii``: ``+/`` where base64url has ``-_``) in the order of the values
#: its characters stand for, and the base64url characters in ASCII order: translating the one to
#: the other makes a :func:`new_jti`'s text sort like its bytes (only URL-safe characters still).
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_ORDERED = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_TO_ORDERED = bytes.maketrans(_BASE64, _ORDERED)


#: Added to the milliseconds: the first six bits are then 16 (``F``) until the year 2109, never 0
#: (``-``, which a command line reads as the start of an option), and the field lasts to the year
#: 8600.
_TIME_BASE = 16 << 42


def new_jti() -> str:
    """A new identifier (a token's ``jti``, a transaction's ``txn``): 22 URL-safe characters, 128
    bits, of which the first 48 count milliseconds (since the epoch, plus ``_TIME_BASE``) and the
    other 80 are random.

    As unique and as unguessable as our uses need (80 random bits per millisecond; a ``jti`` is no
    secret, the token's signature is what counts, and its ``iat`` tells the time already), but
    increasing with time: the text sorts by the millisecond it was made in. A row keyed by one of
    these (``ssf_derivations``, the ledger's transaction index, ``security_events``) is then added
    at the end of its b-tree, where a random key lands on a random page: on SQLite, one page
    written per batch instead of one per row (docs/token_exchange.md, "Performance"). Nothing reads
    the time back: to every reader a ``jti`` is an opaque string."""
    millis = time.time_ns() // 1_000_000 + _TIME_BASE
    raw = millis.to_bytes(6, "big") + os.urandom(10)
    return binascii.b2a_base64(raw, newline=False)[:22].translate(_TO_ORDERED).decode("ascii")
