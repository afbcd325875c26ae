"""Server-provided DPoP nonces (RFC 9449 §8, §9) that every server of a deployment accepts, without
any state shared per request.

A nonce names a time window and proves that this deployment made it::

    nonce = base64url(window || HMAC-SHA256(key, lifetime || window)[:16])

``window`` is ``floor(now / lifetime)`` as 8 bytes; ``key`` is derived with HKDF-SHA256 from a secret
every instance already has (the key-encryption key on trustplane, a secret of its own on a resource
server), so any instance verifies any instance's nonce. The current and the previous window are
accepted: a nonce lives between ``lifetime`` and ``2 * lifetime`` seconds, then the client is told
``use_dpop_nonce`` with a fresh one. Rotation needs no coordination beyond roughly synchronized clocks.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustplane.jose.jws import JWSError, b64url_decode, b64url_encode

HKDF_INFO = b"trustplane dpop-nonce v1"
MAC_BYTES = 16
WINDOW_BYTES = 8
#: base64url of 24 bytes.
NONCE_LENGTH = 32


def derive_nonce_key(secret: bytes) -> bytes:
    """The nonce MAC key: HKDF-SHA256 of a deployment secret, bound to this one use."""
    if len(secret) < 16:
        raise ValueError("the nonce secret must be at least 16 bytes")
    return HKDF(hashes.SHA256(), 32, salt=None, info=HKDF_INFO).derive(secret)


class NonceSource:
    """Issues and checks the nonces of one deployment. ``lifetime``: seconds per window."""

    __slots__ = ("_key", "lifetime")

    def __init__(self, secret: bytes, lifetime: int) -> None:
        if lifetime < 1:
            raise ValueError("the nonce lifetime must be at least 1 second")
        self._key, self.lifetime = derive_nonce_key(secret), lifetime

    def current(self, now: float) -> str:
        """The nonce of the window ``now`` falls in (what a ``DPoP-Nonce`` header carries)."""
        return self._make(int(now // self.lifetime))

    def accepts(self, nonce: object, now: float) -> bool:
        """True for a nonce of this deployment from the current or the previous window."""
        if not isinstance(nonce, str) or len(nonce) != NONCE_LENGTH:
            return False
        try:
            raw = b64url_decode(nonce)
        except JWSError:
            return False
        window = int.from_bytes(raw[:WINDOW_BYTES], "big")
        current = int(now // self.lifetime)
        if window not in (current, current - 1):
            return False
        return hmac.compare_digest(raw[WINDOW_BYTES:], self._mac(window))

    def _make(self, window: int) -> str:
        return b64url_encode(window.to_bytes(WINDOW_BYTES, "big") + self._mac(window))

    def _mac(self, window: int) -> bytes:
        message = self.lifetime.to_bytes(4, "big") + window.to_bytes(WINDOW_BYTES, "big")
        return hmac.new(self._key, message, hashlib.sha256).digest()[:MAC_BYTES]
