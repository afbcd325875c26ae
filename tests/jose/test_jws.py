"""Compact JWS (RFC 7515): our signer and parser against PyJWT, and every refusal of the allow-list."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from trustplane.jose.jwk import PrivateKey
from trustplane.jose.jws import MAX_COMPACT_LENGTH, JWSError, Signer, b64url_encode, parse

CLAIMS = {"iss": "https://as.example", "sub": "client-1", "n": 7, "scope": "order:create"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: Any, payload: Any = None, signature: bytes = b"\x00" * 64) -> str:
    """A compact JWS with arbitrary (possibly hostile) parts; the signature is not meaningful."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = payload if isinstance(payload, bytes) else json.dumps(payload or CLAIMS).encode()
    return f"{_b64(head)}.{_b64(body)}.{_b64(signature)}"


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    return {
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
        "PS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


ALGS = ["ES256", "EdDSA", "PS256"]


# --------------------------------------------------------------------------- interoperability


@pytest.mark.parametrize("alg", ALGS)
def test_our_tokens_verify_in_pyjwt(keys: dict[str, PrivateKey], alg: str) -> None:
    token = Signer(keys[alg], alg, kid="kid-1", typ="at+jwt").sign(CLAIMS)

    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": "kid-1", "typ": "at+jwt"}
    decoded = jwt.decode(token, keys[alg].public_key(), algorithms=[alg])
    assert decoded == CLAIMS


@pytest.mark.parametrize("alg", ALGS)
def test_pyjwt_tokens_verify_with_us(keys: dict[str, PrivateKey], alg: str) -> None:
    token = jwt.encode(CLAIMS, keys[alg], algorithm=alg, headers={"kid": "kid-2"})

    parsed = parse(token)

    assert parsed.alg == alg
    assert parsed.header["kid"] == "kid-2"
    assert parsed.verify(keys[alg].public_key()) is True
    assert parsed.claims() == CLAIMS


@pytest.mark.parametrize("alg", ALGS)
def test_round_trip_and_tampering(keys: dict[str, PrivateKey], alg: str) -> None:
    token = Signer(keys[alg], alg, kid="k", typ="JWT").sign(CLAIMS)
    head, _, sig = token.split(".")
    forged = f"{head}.{b64url_encode(json.dumps({**CLAIMS, 'n': 8}).encode())}.{sig}"

    assert parse(token).verify(keys[alg].public_key()) is True
    assert parse(forged).verify(keys[alg].public_key()) is False


@pytest.fixture(scope="module")
def other_keys() -> dict[str, PrivateKey]:
    return {
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
        "PS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.mark.parametrize("alg", ALGS)
def test_other_key_of_the_same_type_does_not_verify(
    keys: dict[str, PrivateKey], other_keys: dict[str, PrivateKey], alg: str
) -> None:
    token = Signer(keys[alg], alg, kid="k", typ="JWT").sign(CLAIMS)

    assert parse(token).verify(other_keys[alg].public_key()) is False


@pytest.mark.parametrize(
    ("alg", "wrong"),
    [
        ("ES256", "PS256"),
        ("ES256", "EdDSA"),
        ("EdDSA", "ES256"),
        ("EdDSA", "PS256"),
        ("PS256", "ES256"),
        ("PS256", "EdDSA"),
    ],
)
def test_key_of_the_wrong_type_for_the_alg_never_verifies(
    keys: dict[str, PrivateKey], alg: str, wrong: str
) -> None:
    token = Signer(keys[alg], alg, kid="k", typ="JWT").sign(CLAIMS)

    assert parse(token).verify(keys[wrong].public_key()) is False


@pytest.mark.parametrize(
    ("alg", "wrong"),
    [("ES256", "PS256"), ("ES256", "EdDSA"), ("EdDSA", "ES256"), ("PS256", "ES256")],
)
def test_signer_refuses_a_key_of_the_wrong_type(
    keys: dict[str, PrivateKey], alg: str, wrong: str
) -> None:
    with pytest.raises(JWSError, match=rf"^key does not match algorithm {alg}$"):
        Signer(keys[wrong], alg, kid="k", typ="JWT")


def test_signer_refuses_an_es256_key_on_another_curve() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())

    with pytest.raises(JWSError, match=r"^key does not match algorithm ES256$"):
        Signer(p384, "ES256", kid="k", typ="JWT")


def test_es256_token_does_not_verify_with_a_key_on_another_curve(
    keys: dict[str, PrivateKey],
) -> None:
    token = Signer(keys["ES256"], "ES256", kid="k", typ="JWT").sign(CLAIMS)
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()

    assert parse(token).verify(p384) is False


@pytest.mark.parametrize("alg", ["none", "HS256", "RS256", "ES384", "ES512", "Ed25519", ""])
def test_signer_refuses_algorithms_outside_the_allow_list(
    keys: dict[str, PrivateKey], alg: str
) -> None:
    with pytest.raises(JWSError, match=rf"^algorithm '{alg}' is not allowed$"):
        Signer(keys["ES256"], alg, kid="k", typ="JWT")


# --------------------------------------------------------------------------- refusals


def test_alg_none_is_refused() -> None:
    token = compact({"alg": "none", "typ": "JWT"}, signature=b"")

    with pytest.raises(JWSError, match=r"^algorithm 'none' is not allowed$"):
        parse(token)


def test_alg_none_from_pyjwt_is_refused() -> None:
    token = jwt.encode(CLAIMS, None, algorithm="none")

    with pytest.raises(JWSError, match=r"^algorithm 'none' is not allowed$"):
        parse(token)


def test_hs256_is_refused() -> None:
    token = jwt.encode(CLAIMS, "a-shared-secret-of-at-least-32-bytes!!", algorithm="HS256")

    with pytest.raises(JWSError, match=r"^algorithm 'HS256' is not allowed$"):
        parse(token)


def test_hs256_signed_with_the_public_key_as_secret_is_refused(
    keys: dict[str, PrivateKey],
) -> None:
    """The classic key-confusion attack: HMAC keyed with the verifier's own public key bytes."""
    pem = (
        keys["ES256"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    signing_input = f"{header}.{_b64(json.dumps(CLAIMS).encode())}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{_b64(mac)}"

    with pytest.raises(JWSError, match=r"^algorithm 'HS256' is not allowed$"):
        parse(token)


@pytest.mark.parametrize(
    "alg", ["RS256", "ES384", "ES256K", "HS512", "Ed25519", "es256", "", None, 256, ["ES256"]]
)
def test_unknown_or_disallowed_alg_is_refused(alg: Any) -> None:
    with pytest.raises(JWSError, match=r"^algorithm .* is not allowed$"):
        parse(compact({"alg": alg}))


def test_missing_alg_is_refused() -> None:
    with pytest.raises(JWSError, match=r"^algorithm None is not allowed$"):
        parse(compact({"typ": "JWT"}))


def test_crit_header_is_refused(keys: dict[str, PrivateKey]) -> None:
    token = jwt.encode(
        CLAIMS, keys["ES256"], algorithm="ES256", headers={"crit": ["exp"], "exp": 1}
    )

    with pytest.raises(JWSError, match=r"^no critical header parameter is understood$"):
        parse(token)


def _valid(keys: dict[str, PrivateKey]) -> tuple[str, str, str]:
    head, body, sig = Signer(keys["ES256"], "ES256", kid="k", typ="JWT").sign(CLAIMS).split(".")
    return head, body, sig


def _unaligned(keys: dict[str, PrivateKey]) -> list[str]:
    """A valid token whose segments all have lengths that are not multiples of 4 (so that
    base64 padding would apply to each of them)."""
    signer = Signer(keys["ES256"], "ES256", kid="k", typ="JWT")
    for n in range(4):
        parts = signer.sign({**CLAIMS, "pad": "x" * n}).split(".")
        if all(len(part) % 4 for part in parts):
            return parts
    raise AssertionError("no unaligned token")


@pytest.mark.parametrize("segment", [0, 1, 2])
def test_padded_base64url_is_refused(keys: dict[str, PrivateKey], segment: int) -> None:
    parts = _unaligned(keys)
    parts[segment] += "=" * (-len(parts[segment]) % 4)

    with pytest.raises(JWSError, match=r"^base64url must not be padded$"):
        parse(".".join(parts))


@pytest.mark.parametrize("segment", [0, 1, 2])
@pytest.mark.parametrize("junk", ["+", "/", " ", "\n", "!"])
def test_characters_outside_the_base64url_alphabet_are_refused(
    keys: dict[str, PrivateKey], segment: int, junk: str
) -> None:
    parts = list(_valid(keys))
    parts[segment] = parts[segment][:4] + junk + parts[segment][4:]

    with pytest.raises(JWSError, match=r"^invalid base64url$"):
        parse(".".join(parts))


def test_standard_base64_alphabet_is_refused(keys: dict[str, PrivateKey]) -> None:
    """``+`` and ``/`` are base64, not base64url: the same signature must not have two spellings."""
    for _ in range(50):
        head, body, sig = _valid(keys)
        if "-" in sig or "_" in sig:
            break
    swapped = sig.replace("-", "+").replace("_", "/")
    assert swapped != sig

    with pytest.raises(JWSError, match=r"^invalid base64url$"):
        parse(f"{head}.{body}.{swapped}")


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _respellings(segment: str) -> list[str]:
    """The other texts that a lenient base64url decoder reads as the same bytes: the last character
    with different unused low bits (4 bits at length 2 mod 4, 2 bits at length 3 mod 4)."""
    unused = {2: 4, 3: 2}[len(segment) % 4]
    value = _ALPHABET.index(segment[-1])
    same = [value - value % (1 << unused) + low for low in range(1 << unused)]
    return [segment[:-1] + _ALPHABET[v] for v in same if v != value]


def test_es256_signature_with_non_zero_unused_bits_is_refused(keys: dict[str, PrivateKey]) -> None:
    """RFC 4648 §3.5: an 86-character ES256 signature ends in 4 unused bits; a decoder that ignored
    them would accept 15 more spellings of one signature (anything keyed on the token text, such as
    a revocation or replay entry, would see a new token)."""
    head, body, sig = _valid(keys)
    others = _respellings(sig)

    assert len(sig) == 86
    assert len(others) == 15
    assert all(
        base64.urlsafe_b64decode(o + "==") == base64.urlsafe_b64decode(sig + "==") for o in others
    )
    assert parse(f"{head}.{body}.{sig}").verify(keys["ES256"].public_key()) is True
    for other in others:
        with pytest.raises(JWSError, match=r"^non-canonical base64url$"):
            parse(f"{head}.{body}.{other}")


@pytest.mark.parametrize("segment", [0, 1, 2])
def test_any_segment_with_non_zero_unused_bits_is_refused(
    keys: dict[str, PrivateKey], segment: int
) -> None:
    parts = _unaligned(keys)
    parse(".".join(parts))  # the canonical spelling parses
    for other in _respellings(parts[segment]):
        changed = list(parts)
        changed[segment] = other
        with pytest.raises(JWSError, match=r"^non-canonical base64url$"):
            parse(".".join(changed))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"not json", "^header is not JSON$"),
        (b'{"alg":"ES256"', "^header is not JSON$"),
        (b"\xff\xfe", "^header is not JSON$"),
        (b"[1, 2]", "^header is not a JSON object$"),
        (b'"ES256"', "^header is not a JSON object$"),
        (b"null", "^header is not a JSON object$"),
        (b"", "^header is not JSON$"),
    ],
)
def test_header_must_be_a_json_object(header: bytes, message: str) -> None:
    with pytest.raises(JWSError, match=message):
        parse(compact(header))


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"not json", "^payload is not JSON$"), (b"[1]", "^payload is not a JSON object$")],
)
def test_claims_must_be_a_json_object(payload: bytes, message: str) -> None:
    parsed = parse(compact({"alg": "ES256"}, payload))

    with pytest.raises(JWSError, match=message):
        parsed.claims()


def _token_of_length(keys: dict[str, PrivateKey], length: int) -> str:
    signer = Signer(keys["ES256"], "ES256", kid="k", typ="JWT")
    estimate = (length - len(signer.sign({"pad": ""}))) * 3 // 4
    for n in range(estimate - 4, estimate + 4):
        token = signer.sign({"pad": "x" * n})
        if len(token) == length:
            return token
    raise AssertionError(f"could not build a token of exactly {length} characters")


def test_token_of_exactly_16_kib_is_accepted(keys: dict[str, PrivateKey]) -> None:
    token = _token_of_length(keys, MAX_COMPACT_LENGTH)

    assert MAX_COMPACT_LENGTH == 16 * 1024
    assert parse(token).verify(keys["ES256"].public_key()) is True


def test_token_over_16_kib_is_refused(keys: dict[str, PrivateKey]) -> None:
    token = _token_of_length(keys, MAX_COMPACT_LENGTH + 1)

    with pytest.raises(JWSError, match=r"^token too large$"):
        parse(token)


@pytest.mark.parametrize("segment", [0, 1])
def test_non_ascii_in_the_signing_input_is_refused(
    keys: dict[str, PrivateKey], segment: int
) -> None:
    parts = list(_valid(keys))
    parts[segment] = parts[segment][:5] + "é" + parts[segment][5:]

    with pytest.raises(JWSError, match=r"^token must be ASCII$"):
        parse(".".join(parts))


def test_non_ascii_in_the_signature_is_refused(keys: dict[str, PrivateKey]) -> None:
    head, body, sig = _valid(keys)

    with pytest.raises(JWSError, match=r"^invalid base64url$"):
        parse(f"{head}.{body}.{sig[:5]}é{sig[5:]}")


@pytest.mark.parametrize("count", [1, 2, 4, 5])
def test_wrong_number_of_segments_is_refused(keys: dict[str, PrivateKey], count: int) -> None:
    parts = list(_valid(keys))
    segments = (parts + parts)[:count]

    with pytest.raises(JWSError, match=r"^not a compact JWS$"):
        parse(".".join(segments))


def test_empty_token_is_refused() -> None:
    with pytest.raises(JWSError, match=r"^not a compact JWS$"):
        parse("")


def test_es256_signature_of_the_wrong_length_does_not_verify(keys: dict[str, PrivateKey]) -> None:
    head, body, sig = _valid(keys)
    raw = base64.urlsafe_b64decode(sig + "==")

    short, long = _b64(raw[:63]), _b64(raw + b"\x00")

    assert len(raw) == 64
    assert parse(f"{head}.{body}.{short}").verify(keys["ES256"].public_key()) is False
    assert parse(f"{head}.{body}.{long}").verify(keys["ES256"].public_key()) is False


# --------------------------------------------------------------------------- base64url itself


@pytest.mark.parametrize("length", range(70))
def test_base64url_matches_the_standard_library_at_every_length(length: int) -> None:
    """The encoder and decoder call ``binascii`` directly; they must agree with RFC 4648 §5 as the
    standard library spells it, for every remainder and for the bytes that map to ``-`` and ``_``."""
    from trustplane.jose.jws import b64url_decode

    for data in (bytes(range(256))[length : length * 2 + 1], b"\xfb\xff\xbf" * length):
        data = data[:length] if len(data) >= length else data
        text = b64url_encode(data)
        assert text == _b64(data)
        assert b64url_decode(text) == data


def test_base64url_decode_refuses_what_the_standard_library_would_skip() -> None:
    """``binascii`` ignores characters outside the alphabet unless told otherwise: the alphabet
    check in front of it is what refuses them."""
    from trustplane.jose.jws import b64url_decode

    for text in ("ab+c", "ab/c", "ab c", "ab\nc", "abé", "ab=c"):
        with pytest.raises(JWSError):
            b64url_decode(text)
