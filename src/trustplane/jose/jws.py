"""Compact JWS (RFC 7515) signing and verification with an explicit algorithm allow-list.

Only ES256, EdDSA (Ed25519) and PS256 exist here: ``none`` and the HMAC family are unrepresentable,
so a token cannot talk its way into them. Header parameters that name keys or URLs (``jku``, ``x5u``,
``jwk``, ``x5c``) are never used to choose a key; the caller supplies the candidate keys.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from trustplane.jose.jwk import PrivateKey, PublicKey

ALGORITHMS = ("ES256", "EdDSA", "PS256")
#: Nothing legitimate in this product is larger; bigger inputs are refused before any parsing.
MAX_COMPACT_LENGTH = 16 * 1024
_SHA256 = hashes.SHA256()
_PSS = padding.PSS(mgf=padding.MGF1(_SHA256), salt_length=32)
_ECDSA = ec.ECDSA(_SHA256)
#: RFC 7515 §2: the URL-safe alphabet only (the decoder would silently accept or skip anything else).
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
#: RFC 4648 §3.5: the bits after the last whole byte must be zero, else one value has several spellings
#: (an ES256 signature of 86 characters ends in 4 such bits: 16 texts, one signature). The last
#: character of a segment of length 2 or 3 (mod 4) must be one whose unused low bits are 0.
_CANONICAL_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


class JWSError(ValueError):
    """The JWS is malformed or its signature does not verify."""


#: ``binascii`` directly: ``base64.urlsafe_b64encode``/``urlsafe_b64decode`` wrap the same calls in
#: three Python layers (type checks, a ``bytes.translate`` each way); six calls per token request.
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_PADDING = {0: b"", 2: b"==", 3: b"="}


def b64url_encode(data: bytes) -> str:
    return (
        binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")
    )


def b64url_decode(text: str) -> bytes:
    if "=" in text:
        raise JWSError("base64url must not be padded")
    tail = len(text) % 4
    if not _BASE64URL.fullmatch(text) or tail == 1:
        raise JWSError("invalid base64url")
    if tail and text[-1] not in _CANONICAL_LAST[tail]:
        raise JWSError("non-canonical base64url")
    try:  # ASCII from here on: the alphabet was checked above
        return binascii.a2b_base64(text.encode("ascii").translate(_FROM_URLSAFE) + _PADDING[tail])
    except (binascii.Error, ValueError) as exc:
        raise JWSError("invalid base64url") from exc


class ParsedJWS:
    """A compact JWS split and decoded, signature not yet checked."""

    __slots__ = ("header", "payload", "signature", "signing_input")

    def __init__(self, token: str) -> None:
        if len(token) > MAX_COMPACT_LENGTH:
            raise JWSError("token too large")
        parts = token.split(".")
        if len(parts) != 3:
            raise JWSError("not a compact JWS")
        self.signing_input = f"{parts[0]}.{parts[1]}".encode("ascii", "strict")
        self.header = _json_object(b64url_decode(parts[0]), "header")
        self.payload = b64url_decode(parts[1])
        self.signature = b64url_decode(parts[2])
        alg = self.header.get("alg")
        if alg not in ALGORITHMS:
            raise JWSError(f"algorithm {alg!r} is not allowed")
        if "crit" in self.header:
            raise JWSError("no critical header parameter is understood")

    @property
    def alg(self) -> str:
        return str(self.header["alg"])

    def claims(self) -> dict[str, Any]:
        return _json_object(self.payload, "payload")

    def verify(self, key: PublicKey) -> bool:
        """True if the signature verifies with ``key`` under the header's algorithm."""
        return _VERIFIERS[self.alg](key, self.signature, self.signing_input)


def parse(token: str) -> ParsedJWS:
    try:
        return ParsedJWS(token)
    except UnicodeEncodeError as exc:
        raise JWSError("token must be ASCII") from exc


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise JWSError(f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise JWSError(f"{what} is not a JSON object")
    return value


def _verify_es256(key: PublicKey, sig: bytes, data: bytes) -> bool:
    if not isinstance(key, ec.EllipticCurvePublicKey) or len(sig) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, data, _ECDSA)
    except InvalidSignature:
        return False
    return True


def _verify_eddsa(key: PublicKey, sig: bytes, data: bytes) -> bool:
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return False
    try:
        key.verify(sig, data)
    except InvalidSignature:
        return False
    return True


def _verify_ps256(key: PublicKey, sig: bytes, data: bytes) -> bool:
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        key.verify(sig, data, _PSS, _SHA256)
    except InvalidSignature:
        return False
    return True


_VERIFIERS: dict[str, Callable[[PublicKey, bytes, bytes], bool]] = {
    "ES256": _verify_es256,
    "EdDSA": _verify_eddsa,
    "PS256": _verify_ps256,
}


class Signer:
    """Signs compact JWS with one private key; the protected header is encoded once."""

    __slots__ = ("_header_b64", "_sign", "alg", "kid")

    def __init__(self, key: PrivateKey, alg: str, kid: str, typ: str) -> None:
        if alg not in ALGORITHMS:
            raise JWSError(f"algorithm {alg!r} is not allowed")
        self.alg, self.kid = alg, kid
        header = {"alg": alg, "kid": kid, "typ": typ}
        self._header_b64 = b64url_encode(orjson.dumps(header))
        self._sign = _signer(key, alg)

    def with_typ(self, typ: str) -> Signer:
        """The same key and ``kid`` under another ``typ`` (e.g. ``secevent+jwt``, RFC 8417 §2.3)."""
        other = object.__new__(Signer)
        other.alg, other.kid, other._sign = self.alg, self.kid, self._sign
        header = {"alg": self.alg, "kid": self.kid, "typ": typ}
        other._header_b64 = b64url_encode(orjson.dumps(header))
        return other

    def sign(self, claims: dict[str, Any]) -> str:
        signing_input = f"{self._header_b64}.{b64url_encode(orjson.dumps(claims))}"
        signature = self._sign(signing_input.encode("ascii"))
        return f"{signing_input}.{b64url_encode(signature)}"


def _signer(key: PrivateKey, alg: str) -> Callable[[bytes], bytes]:
    if (
        alg == "ES256"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        ec_key = key

        def sign_es256(data: bytes) -> bytes:
            r, s = decode_dss_signature(ec_key.sign(data, _ECDSA))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        return sign_es256
    if alg == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    if alg == "PS256" and isinstance(key, rsa.RSAPrivateKey):
        rsa_key = key
        return lambda data: rsa_key.sign(data, _PSS, _SHA256)
    raise JWSError(f"key does not match algorithm {alg}")
