"""The canonical form of a ledger entry: RFC 8785 (JCS) JSON of the event envelope, with the personal
payload replaced by a salted commitment.

Why ``orjson`` with sorted keys is RFC 8785 here (the property test in ``tests/audit/test_canonical.py``
checks byte equality against the independent ``rfc8785`` implementation over generated envelopes):

- JCS sorts object members by their UTF-16 code units; orjson sorts by UTF-8 bytes (code points). The
  two orders differ only between characters above U+FFFF and those in U+E000..U+FFFF. Every key of an
  entry is one of the fixed ASCII envelope names, so the orders are the same.
- Strings: both write UTF-8 unescaped except ``"``, ``\\`` and the C0 controls, which both escape as
  ``\\b \\t \\n \\f \\r`` or lowercase ``\\u00xx``. Lone surrogates (not Unicode, refused by both)
  can only come from unvalidated caller input; they are replaced by U+FFFD before canonicalising.
- Numbers: the only numbers are integers (``time``, ``mandate_version``). JCS prints the IEEE-754
  double, which is the integer itself only within +-(2**53 - 1); outside that range the entry is refused
  (:class:`EntryError`) rather than silently rounded. No floats, so no float formatting question.
- No insignificant whitespace in either. ``null``, ``true``/``false`` and arrays of strings are the same.

The payload (names, e-mails, free text, anything personal) is not part of the entry. The entry carries
``payload_hash`` = hex SHA-256(salt || payload bytes), with a fresh 16-byte salt per entry; the payload
bytes and the salt are stored beside the leaf and can be purged without touching the leaf.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import fields
from typing import Any

import orjson

from trustplane.audit_events import AuditEvent

MAX_SAFE_INTEGER = 2**53 - 1
SALT_BYTES = 16
_SORTED = orjson.OPT_SORT_KEYS
SURROGATE = re.compile("[\ud800-\udfff]")
#: Envelope fields that hold integers (everything else is a string, null or a list of strings).
_INT_FIELDS = ("time", "mandate_version")


class EntryError(ValueError):
    """The envelope cannot be canonicalised (an integer outside the JCS-safe domain)."""


def canonical_bytes(envelope: dict[str, Any]) -> bytes:
    """JCS bytes of an envelope dict (strings, safe integers, null, lists of strings only)."""
    for name in _INT_FIELDS:
        value = envelope.get(name)
        if value is not None and (
            type(value) is not int or not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
        ):
            raise EntryError(f"{name} must be an integer within +-(2**53 - 1), got {value!r}")
    try:
        return orjson.dumps(envelope, option=_SORTED)
    except (
        TypeError
    ):  # a lone surrogate (unvalidated caller input): record it replaced, not lose it
        return orjson.dumps(_replace_surrogates(envelope), option=_SORTED)


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return SURROGATE.sub("\ufffd", value)
    if isinstance(value, list | tuple):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


def commit_payload(payload: dict[str, Any], salt: bytes) -> tuple[bytes, str]:
    """The stored payload bytes and their salted commitment (hex SHA-256(salt || bytes))."""
    try:
        data = orjson.dumps(payload, option=_SORTED)
    except TypeError:
        data = orjson.dumps(_replace_surrogates(payload), option=_SORTED)
    return data, hashlib.sha256(salt + data).hexdigest()


def payload_matches(entry: dict[str, Any], payload: bytes, salt: bytes) -> bool:
    return hashlib.sha256(salt + payload).hexdigest() == entry.get("payload_hash")


def entry_parts(event: AuditEvent, salt: bytes | None = None) -> tuple[bytes, bytes, bytes]:
    """(entry bytes, payload bytes, salt) for one event: the hot-path cost of an append.

    The envelope is read straight off the event's fields (the lists stay tuples, the type stays its
    enum: orjson writes both as the same JSON), without :meth:`AuditEvent.to_dict`'s copy.
    ``salt``: a fresh random one unless given (tests)."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    payload, digest = commit_payload(event.payload, salt)
    envelope = {name: getattr(event, name) for name in _ENVELOPE}
    envelope["payload_hash"] = digest
    return canonical_bytes(envelope), payload, salt


#: The event's fields that go into its entry as they are: all but the payload (replaced by its
#: commitment, ``payload_hash``).
_ENVELOPE = tuple(f.name for f in fields(AuditEvent) if f.name != "payload")


def dict_entry_parts(body: dict[str, Any]) -> tuple[bytes, bytes, bytes]:
    """The same for an event already held as a dict (the interim table's rows, migrated)."""
    envelope = dict(body)
    salt = os.urandom(SALT_BYTES)
    payload, envelope["payload_hash"] = commit_payload(envelope.pop("payload", None) or {}, salt)
    return canonical_bytes(envelope), payload, salt
