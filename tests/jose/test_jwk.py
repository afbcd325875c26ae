"""JSON Web Keys (RFC 7517): thumbprint vectors (RFC 7638), and what public-key import refuses."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey

from trustplane.jose.jwk import (
    PRIVATE_MEMBERS,
    JWKError,
    import_public_jwk,
    import_public_jwks,
    thumbprint,
)
from trustplane.jose.jws import b64url_encode

VECTORS = json.loads(
    (Path(__file__).parent.parent / "fixtures" / "jwk_thumbprints.json").read_text()
)["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["source"] for v in VECTORS])
def test_thumbprint_example_vectors(vector: dict[str, Any]) -> None:
    assert thumbprint(vector["jwk"]) == vector["thumbprint"]


def test_rfc7638_vector_is_in_the_fixture() -> None:
    rsa_vector = next(v for v in VECTORS if v["source"] == "RFC 7638 section 3.1")

    assert rsa_vector["thumbprint"] == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_ec_thumbprint_hashes_the_required_members_in_lexicographic_order() -> None:
    jwk = dict(ECKey.import_key(ec.generate_private_key(ec.SECP256R1()).public_key()).as_dict())
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]},
        separators=(",", ":"),
        sort_keys=True,
    )
    expected = b64url_encode(hashlib.sha256(canonical.encode()).digest())

    assert thumbprint(jwk) == expected
    assert thumbprint({**jwk, "kid": "ignored", "use": "sig", "alg": "ES256"}) == expected


# --------------------------------------------------------------------------- import


@pytest.fixture(scope="module")
def ec_private() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_private() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def ec_jwk(ec_private: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    return dict(ECKey.import_key(ec_private.public_key()).as_dict())


@pytest.fixture(scope="module")
def rsa_jwk(rsa_private: rsa.RSAPrivateKey) -> dict[str, Any]:
    return dict(RSAKey.import_key(rsa_private.public_key()).as_dict())


@pytest.fixture(scope="module")
def ed_jwk(ed_private: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    return dict(OKPKey.import_key(ed_private.public_key()).as_dict())


def test_imports_an_ec_p256_key(ec_jwk: dict[str, Any], ec_private: Any) -> None:
    alg, key = import_public_jwk({**ec_jwk, "alg": "ES256", "use": "sig", "kid": "a"})

    assert alg == "ES256"
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.public_numbers() == ec_private.public_key().public_numbers()


def test_imports_an_ed25519_key(ed_jwk: dict[str, Any], ed_private: Any) -> None:
    alg, key = import_public_jwk(ed_jwk)

    assert alg == "EdDSA"
    assert isinstance(key, ed25519.Ed25519PublicKey)
    assert key == ed_private.public_key()


def test_imports_an_rsa_2048_key_for_ps256(rsa_jwk: dict[str, Any], rsa_private: Any) -> None:
    alg, key = import_public_jwk({**rsa_jwk, "alg": "PS256"})

    assert alg == "PS256"
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.public_numbers() == rsa_private.public_key().public_numbers()


def _private_jwk(kind: str) -> dict[str, Any]:
    if kind == "EC":
        ec_key = ECKey.import_key(ec.generate_private_key(ec.SECP256R1()))
        return dict(ec_key.as_dict(private=True))
    if kind == "OKP":
        okp_key = OKPKey.import_key(ed25519.Ed25519PrivateKey.generate())
        return dict(okp_key.as_dict(private=True))
    rsa_key = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return dict(rsa_key.as_dict(private=True))


@pytest.mark.parametrize("kind", ["EC", "OKP", "RSA"])
def test_a_full_private_jwk_is_refused(kind: str) -> None:
    jwk = _private_jwk(kind)
    assert "d" in jwk

    with pytest.raises(JWKError, match=r"^jwks must not contain private or symmetric key members$"):
        import_public_jwk(jwk)


@pytest.mark.parametrize("member", sorted(PRIVATE_MEMBERS))
def test_each_private_member_alone_is_refused(rsa_jwk: dict[str, Any], member: str) -> None:
    with pytest.raises(JWKError, match=r"^jwks must not contain private or symmetric key members$"):
        import_public_jwk({**rsa_jwk, member: "AQAB"})


def test_private_members_cover_rfc7518_and_symmetric_keys() -> None:
    assert frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"}) == PRIVATE_MEMBERS


def test_symmetric_oct_key_is_refused() -> None:
    with pytest.raises(JWKError, match=r"^jwks must not contain private or symmetric key members$"):
        import_public_jwk({"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"})


def test_oct_key_without_k_is_still_refused() -> None:
    with pytest.raises(JWKError, match=r"^unsupported key type 'oct'$"):
        import_public_jwk({"kty": "oct", "alg": "HS256"})


@pytest.mark.parametrize("bits", [1024, 2040])
def test_rsa_key_under_2048_bits_is_refused(bits: int) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    with warnings.catch_warnings():  # joserfc warns about the size too; the refusal is ours
        warnings.simplefilter("ignore", SecurityWarning)
        jwk = dict(RSAKey.import_key(small).as_dict())

        with pytest.raises(JWKError, match=r"^RSA keys must be at least 2048 bits$"):
            import_public_jwk(jwk)


@pytest.mark.parametrize(
    ("fixture", "alg", "message"),
    [
        ("ec_jwk", "ES384", "^key alg 'ES384' is not allowed for a EC key \\(use ES256\\)$"),
        ("ec_jwk", "EdDSA", "^key alg 'EdDSA' is not allowed for a EC key \\(use ES256\\)$"),
        ("ec_jwk", "HS256", "^key alg 'HS256' is not allowed for a EC key \\(use ES256\\)$"),
        ("rsa_jwk", "RS256", "^key alg 'RS256' is not allowed for a RSA key \\(use PS256\\)$"),
        ("rsa_jwk", "ES256", "^key alg 'ES256' is not allowed for a RSA key \\(use PS256\\)$"),
        ("ed_jwk", "ES256", "^key alg 'ES256' is not allowed for a OKP key \\(use EdDSA\\)$"),
        ("ed_jwk", "none", "^key alg 'none' is not allowed for a OKP key \\(use EdDSA\\)$"),
    ],
)
def test_mismatched_alg_is_refused(
    request: pytest.FixtureRequest, fixture: str, alg: str, message: str
) -> None:
    jwk = request.getfixturevalue(fixture)

    with pytest.raises(JWKError, match=message):
        import_public_jwk({**jwk, "alg": alg})


@pytest.mark.parametrize("use", ["enc", "", "SIG", 1])
def test_use_other_than_sig_is_refused(ec_jwk: dict[str, Any], use: Any) -> None:
    with pytest.raises(JWKError, match=r"^key use must be 'sig'$"):
        import_public_jwk({**ec_jwk, "use": use})


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        (
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
            "^unsupported key type 'EC' curve 'P-384'$",
        ),
        (
            {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"},
            "^unsupported key type 'EC' curve",
        ),
        ({"kty": "OKP", "crv": "X25519", "x": "AA"}, "^unsupported key type 'OKP' curve 'X25519'$"),
        ({"kty": "OKP", "crv": "Ed448", "x": "AA"}, "^unsupported key type 'OKP' curve 'Ed448'$"),
        ({"kty": "EC", "x": "AA", "y": "AA"}, "^unsupported key type 'EC'$"),
        ({"crv": "P-256", "x": "AA", "y": "AA"}, "^unsupported key type None"),
        ({"kty": "EC", "crv": ["P-256"], "x": "AA", "y": "AA"}, "^unsupported key type 'EC'"),
        ({"kty": ["EC"], "crv": "P-256"}, "^unsupported key type"),
        ({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, "^malformed EC key"),
        ({"kty": "EC", "crv": "P-256"}, "^malformed EC key"),
        ({"kty": "OKP", "crv": "Ed25519", "x": 5}, "^malformed OKP key"),
        ({"kty": "RSA", "e": "AQAB"}, "^malformed RSA key"),
    ],
)
def test_malformed_or_unsupported_keys_are_refused(jwk: dict[str, Any], message: str) -> None:
    with pytest.raises(JWKError, match=message):
        import_public_jwk(jwk)


@pytest.mark.parametrize("jwk", [[], "key", None, 3])
def test_a_key_that_is_not_an_object_is_refused(jwk: Any) -> None:
    with pytest.raises(JWKError, match=r"^each key must be a JSON object$"):
        import_public_jwk(jwk)


# --------------------------------------------------------------------------- JWK Sets


def test_imports_a_jwk_set(ec_jwk: dict[str, Any], ed_jwk: dict[str, Any]) -> None:
    keys = import_public_jwks({"keys": [{**ec_jwk, "kid": "a"}, ed_jwk, ec_jwk]})

    assert [(kid, alg) for kid, alg, _ in keys] == [
        ("a", "ES256"),
        (None, "EdDSA"),
        (None, "ES256"),
    ]


def test_duplicate_kid_is_refused(ec_jwk: dict[str, Any], ed_jwk: dict[str, Any]) -> None:
    with pytest.raises(JWKError, match=r"^kid values must be unique strings$"):
        import_public_jwks({"keys": [{**ec_jwk, "kid": "same"}, {**ed_jwk, "kid": "same"}]})


@pytest.mark.parametrize("kid", [1, ["a"], {"a": 1}])
def test_non_string_kid_is_refused(ec_jwk: dict[str, Any], kid: Any) -> None:
    with pytest.raises(JWKError, match=r"^malformed EC key: .*'kid' must be a str$"):
        import_public_jwks({"keys": [{**ec_jwk, "kid": kid}]})


def test_one_bad_key_refuses_the_whole_set(ec_jwk: dict[str, Any]) -> None:
    with pytest.raises(JWKError, match=r"^key use must be 'sig'$"):
        import_public_jwks({"keys": [{**ec_jwk, "kid": "a"}, {**ec_jwk, "kid": "b", "use": "enc"}]})


@pytest.mark.parametrize("jwks", [{}, {"keys": []}, {"keys": {}}, [], "jwks", None, {"keys": "x"}])
def test_jwk_set_shape_is_checked(jwks: Any) -> None:
    with pytest.raises(JWKError, match=r"^jwks must be an object with a non-empty 'keys' array$"):
        import_public_jwks(jwks)
