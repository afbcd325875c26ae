"""Values the browser carries for us, sealed with HMAC-SHA256: the session cookie, the pending
authorization request (a hidden form field) and the CSRF token.

The MAC key is derived from the key-encryption key (HKDF, one label per purpose), so every process of
a deployment accepts what another one sealed and no new secret needs configuring. Sealed values are
signed, not encrypted: they hold identifiers and the client's own request, nothing secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sealer:
    def __init__(self, kek: bytes) -> None:
        self._key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"trustplane browser seals v1"
        ).derive(kek)

    def _mac(self, purpose: str, body: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}.{body}".encode(), hashlib.sha256).digest())

    def seal(self, purpose: str, data: dict[str, Any], lifetime: int) -> str:
        return self.seal_until(purpose, data, int(time.time()) + lifetime)

    def seal_until(self, purpose: str, data: dict[str, Any], expires_at: int) -> str:
        """Sealed to be opened until ``expires_at`` (seconds since the epoch) and not after."""
        body = _b64(orjson.dumps({**data, "_exp": expires_at}))
        return f"{body}.{self._mac(purpose, body)}"

    def open(self, purpose: str, sealed: str | None) -> dict[str, Any] | None:
        """The sealed dict if the MAC is right, the purpose matches and it has not expired."""
        if not sealed or sealed.count(".") != 1 or len(sealed) > 32768:
            return None
        body, mac = sealed.split(".")
        if not hmac.compare_digest(mac, self._mac(purpose, body)):
            return None
        try:
            data = orjson.loads(_unb64(body))
        except (binascii.Error, ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("_exp"), int):
            return None
        if data["_exp"] <= time.time():
            return None
        return data

    def csrf_token(self, session_id: str) -> str:
        """Synchroniser token bound to the session: a form posted from another origin cannot know it."""
        return self._mac("csrf", session_id)

    def csrf_ok(self, session_id: str, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf_token(session_id))
