"""Password hashing with argon2id (RFC 9106), through ``argon2-cffi``.

Parameters are the library's defaults (RFC 9106 "second recommended" profile: t=3, m=64 MiB, p=4);
hashes made with older parameters are re-hashed on the next successful login (``needs_rehash``).
A login for an unknown user verifies against a fixed dummy hash so that it costs the same time as a
wrong password for a known user.
"""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 12
MAX_LENGTH = 1024


class WeakPasswordError(ValueError):
    """The password does not meet the minimum policy."""


@functools.lru_cache(maxsize=1)
def hasher() -> PasswordHasher:
    return PasswordHasher()  # argon2id is the default type


def check_policy(password: str) -> None:
    """NIST SP 800-63B §5.1.1.2: length is what counts; no composition rules."""
    if len(password) < MIN_LENGTH:
        raise WeakPasswordError(f"passwords must have at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise WeakPasswordError(f"passwords must have at most {MAX_LENGTH} characters")


def hash_password(password: str) -> str:
    check_policy(password)
    return hasher().hash(password)


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hasher().hash("not a password: used for unknown users")


def verify_password(password: str, stored: str | None) -> bool:
    """True if ``password`` matches ``stored``; with ``stored`` None it burns the same time and fails."""
    if len(password) > MAX_LENGTH:  # never hashed at that length: burn the time, refuse
        stored = None
        password = password[:MAX_LENGTH]
    try:
        return hasher().verify(stored or _dummy_hash(), password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    return hasher().check_needs_rehash(stored)
