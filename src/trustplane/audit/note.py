"""C2SP signed-note (https://c2sp.org/signed-note) with Ed25519 keys, and the C2SP tlog-checkpoint body
(https://c2sp.org/tlog-checkpoint) it carries.

- Key id: the first 4 bytes (big-endian uint32) of SHA-256(name || 0x0A || 0x01 || public key), 0x01
  being the Ed25519 signature type.
- Verifier key: ``name+hex8(key id)+base64(0x01 || public key)``.
- A note is UTF-8 text ending in a newline, a blank line, then signature lines
  ``— name base64(key id || signature)`` (U+2014 EM DASH, space). The signature covers the text.
- A checkpoint's text is ``origin``, the tree size in decimal and the base64 root hash, one per line,
  optionally followed by extension lines.

The known-answer vector of golang.org/x/mod/sumdb/note is in ``tests/fixtures/signed_note.json``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ED25519 = 0x01
EM_DASH = "\u2014"
MAX_NOTE = 1 << 20
_NAME = re.compile(r"^[^\s+]+$")
_DECIMAL = re.compile(r"^(0|[1-9][0-9]{0,19})$")


class NoteError(ValueError):
    """The note, key or checkpoint is malformed, or no signature by the expected key verifies."""


def key_id(name: str, public_key: bytes) -> int:
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public_key).digest()
    return int(struct.unpack(">I", digest[:4])[0])


def raw_public_key(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verifier_key(name: str, public_key: bytes) -> str:
    if not _NAME.match(name):
        raise NoteError(f"key name {name!r} must be non-empty, without spaces or '+'")
    encoded = base64.b64encode(bytes([ED25519]) + public_key).decode()
    return f"{name}+{key_id(name, public_key):08x}+{encoded}"


@dataclass(frozen=True, slots=True)
class Verifier:
    name: str
    key_id: int
    public_key: ed25519.Ed25519PublicKey

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """Parse ``name+hash+keydata``; the hash must match the key (it is not trusted as given)."""
        name, sep1, rest = text.strip().partition("+")
        hash_hex, sep2, data = rest.partition("+")
        if not (sep1 and sep2 and _NAME.match(name) and re.fullmatch(r"[0-9a-f]{8}", hash_hex)):
            raise NoteError("verifier key must look like name+hash8+base64key")
        try:
            raw = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise NoteError("verifier key data is not base64") from None
        if len(raw) != 33 or raw[0] != ED25519:
            raise NoteError("verifier key is not an Ed25519 key (type 0x01, 32 bytes)")
        if key_id(name, raw[1:]) != int(hash_hex, 16):
            raise NoteError("verifier key hash does not match its name and key")
        return cls(name, int(hash_hex, 16), ed25519.Ed25519PublicKey.from_public_bytes(raw[1:]))


@dataclass(frozen=True, slots=True)
class Signer:
    name: str
    private_key: ed25519.Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return raw_public_key(self.private_key.public_key())

    @property
    def verifier_key(self) -> str:
        return verifier_key(self.name, self.public_key)

    def sign(self, text: str) -> str:
        """The signed note: ``text`` (ending in a newline), a blank line, one signature line."""
        if not text.endswith("\n") or "\n\n" in text:
            raise NoteError("note text must end with a newline and contain no blank line")
        signature = self.private_key.sign(text.encode())
        blob = struct.pack(">I", key_id(self.name, self.public_key)) + signature
        return f"{text}\n{EM_DASH} {self.name} {base64.b64encode(blob).decode()}\n"


def open_note(note: str, verifier: Verifier) -> str:
    """The verified text of ``note``; NoteError unless a signature line by ``verifier`` verifies.

    Signatures by other (unknown) keys are ignored, as the spec allows; one by a line claiming the
    verifier's name and key id that does not verify is an error."""
    if len(note) > MAX_NOTE or not note.endswith("\n"):
        raise NoteError("note is too large or does not end with a newline")
    text, sep, signatures = note.rpartition("\n\n")
    if not sep:
        raise NoteError("note has no signature block")
    text += "\n"
    for line in signatures.removesuffix("\n").split("\n"):
        prefix, _, rest = line.partition(" ")
        name, _, b64 = rest.partition(" ")
        if prefix != EM_DASH or not name or not b64:
            raise NoteError("malformed signature line")
        try:
            blob = base64.b64decode(b64, validate=True)
        except binascii.Error:
            raise NoteError("signature is not base64") from None
        if len(blob) < 5:
            raise NoteError("signature is too short")
        if name != verifier.name or struct.unpack(">I", blob[:4])[0] != verifier.key_id:
            continue
        try:
            verifier.public_key.verify(blob[4:], text.encode())
        except InvalidSignature:
            raise NoteError(f"the signature by {name} does not verify") from None
        return text
    raise NoteError(f"the note is not signed by the expected key {verifier.name}")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        lines = [
            self.origin,
            str(self.size),
            base64.b64encode(self.root).decode(),
            *self.extensions,
        ]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.removesuffix("\n").split("\n")
        if len(lines) < 3 or not lines[0] or not _DECIMAL.match(lines[1]):
            raise NoteError("checkpoint must have an origin, a decimal tree size and a root hash")
        try:
            root = base64.b64decode(lines[2], validate=True)
        except binascii.Error:
            raise NoteError("checkpoint root hash is not base64") from None
        if len(root) != 32:
            raise NoteError("checkpoint root hash is not 32 bytes")
        return cls(lines[0], int(lines[1]), root, tuple(lines[3:]))


def open_checkpoint(note: str, verifier: Verifier, origin: str | None = None) -> Checkpoint:
    """Verify the signature, then parse; the origin must be the verifier's name (or ``origin``)."""
    checkpoint = Checkpoint.parse(open_note(note, verifier))
    if checkpoint.origin != (origin or verifier.name):
        raise NoteError(
            f"checkpoint origin {checkpoint.origin!r} is not {origin or verifier.name!r}"
        )
    return checkpoint
