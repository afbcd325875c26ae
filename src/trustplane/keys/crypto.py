"""Key generation and private-key encryption at rest (AES-256-GCM under the key-encryption key).

The key-encryption key (KEK) never touches the database. It comes from ``TRUSTPLANE_KEY_ENCRYPTION_KEY``
(32 bytes, base64url) or, on the embedded default only, from a file generated in the data directory.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc.jwk import ECKey, OKPKey, RSAKey

from trustplane.jose.jwk import PrivateKey
from trustplane.settings import decode_kek

KEK_FILE = "kek.b64"
_NONCE = 12


class KeyDecryptionError(Exception):
    """The stored private key cannot be decrypted: wrong KEK or tampered ciphertext."""


def new_kek_text() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def load_or_create_kek_file(data_dir: Path) -> bytes:
    """Embedded default only: the KEK lives in ``data_dir/kek.b64`` (mode 0600)."""
    path = data_dir / KEK_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(new_kek_text() + "\n")
    return decode_kek(path.read_text())


def generate_private_key(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "PS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unsupported signing algorithm {alg!r}")


def public_jwk(key: PrivateKey) -> dict[str, Any]:
    """The public JWK only (never ``d`` or other private members)."""
    public = key.public_key()
    jwk: Any
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECKey.import_key(public)
    elif isinstance(public, ed25519.Ed25519PublicKey):
        jwk = OKPKey.import_key(public)
    else:
        jwk = RSAKey.import_key(public)
    return dict(jwk.as_dict(private=False))


def encrypt_private_key(key: PrivateKey, kek: bytes, kid: str) -> bytes:
    """nonce || AES-256-GCM(PKCS#8 DER), with the kid as associated data (no swapping rows)."""
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    nonce = secrets.token_bytes(_NONCE)
    return nonce + AESGCM(kek).encrypt(nonce, der, kid.encode())


def decrypt_private_key(blob: bytes, kek: bytes, kid: str) -> PrivateKey:
    try:
        der = AESGCM(kek).decrypt(blob[:_NONCE], blob[_NONCE:], kid.encode())
    except InvalidTag:
        raise KeyDecryptionError(
            f"cannot decrypt signing key {kid}: wrong key-encryption key or tampered row"
        ) from None
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise KeyDecryptionError(f"signing key {kid} has an unsupported type")
    return key
