"""PKCE (RFC 7636) with S256 only: RFC 9700 §2.1.1 and FAPI 2.0 refuse ``plain``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

#: Both are used with ``fullmatch`` (``$`` would let a trailing newline through).
#: RFC 7636 §4.1: 43-128 characters of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~".
VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
#: An S256 challenge is BASE64URL(SHA-256(...)) without padding: exactly 43 characters.
S256_CHALLENGE = re.compile(r"[A-Za-z0-9\-_]{43}")


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verifier_matches(verifier: str, challenge: str) -> bool:
    """RFC 7636 §4.6, compared in constant time."""
    if not VERIFIER.fullmatch(verifier):
        return False
    return hmac.compare_digest(s256(verifier), challenge)
