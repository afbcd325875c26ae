"""Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP): HMAC-SHA1, 6 digits, 30 s steps.

Written out here (about twenty lines over ``hmac``) rather than taken from ``pyotp``: the algorithm is
small and fixed by the RFCs, the RFC 6238 Appendix B vectors test it, and what a library would not
give us is the part that matters most: a code is accepted once (the caller stores the last accepted
time step and passes it back as ``after_step``).
"""

from __future__ import annotations

import base64
import hmac
import secrets
import struct
import time
from urllib.parse import quote, urlencode

STEP = 30
DIGITS = 6
#: Steps either side of now that are still accepted (clock drift between phone and server).
WINDOW = 1


def new_secret() -> str:
    """160 random bits (RFC 4226 §4 recommends at least 160), base32 without padding."""
    return base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")


def _key(secret: str) -> bytes:
    return base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))


def hotp(key: bytes, counter: int, digits: int = DIGITS, digest: str = "sha1") -> str:
    """RFC 4226 §5.3: dynamic truncation of HMAC(key, counter)."""
    mac = hmac.new(key, struct.pack(">Q", counter), digest).digest()
    offset = mac[-1] & 0x0F
    code = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(code % 10**digits).zfill(digits)


def now_code(secret: str, at: float | None = None) -> str:
    """The code for ``at`` (default: now); for enrolment checks and tests."""
    return hotp(_key(secret), int((time.time() if at is None else at) // STEP))


def verify(secret: str, code: str, *, after_step: int = -1, at: float | None = None) -> int | None:
    """The time step ``code`` matches (within ``WINDOW``), or None. Steps up to ``after_step`` are
    refused: a code already accepted once cannot be replayed, even inside its 30 s."""
    if len(code) != DIGITS or not code.isdigit():
        return None
    key = _key(secret)
    current = int((time.time() if at is None else at) // STEP)
    match = None
    for step in range(current - WINDOW, current + WINDOW + 1):
        # compare every candidate, so timing does not tell which step matched
        if hmac.compare_digest(hotp(key, step), code) and step > after_step:
            match = step
    return match


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """``otpauth://`` URI (the Key Uri Format authenticator apps read) for a QR code."""
    label = quote(f"{issuer}:{account}")
    query = urlencode({"secret": secret, "issuer": issuer, "algorithm": "SHA1", "digits": DIGITS})
    return f"otpauth://totp/{label}?{query}&period={STEP}"
