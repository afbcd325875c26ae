"""Client metadata for pushed authorization requests (RFC 9126 §6) and request objects (RFC 9101
§10.5, OpenID Connect Dynamic Client Registration §2): each refusal with ``invalid_client_metadata``
and its exact description; accepted values are stored as given."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.clients.test_metadata import DELETE, JWKS, metadata, settings
from trustplane.clients.metadata import validate_metadata
from trustplane.errors import InvalidClientMetadataError
from trustplane.keys.crypto import public_jwk
from trustplane.protocol.scopes import Vocabulary, load_vocabulary

SECRET = {"token_endpoint_auth_method": "client_secret_basic", "jwks": DELETE}

# (id, changes, settings overrides, exact description)
# fmt: off
REFUSALS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("require-par-not-bool", {"require_pushed_authorization_requests": "yes"}, {},
     "require_pushed_authorization_requests: Input should be a valid boolean"),
    ("require-par-number", {"require_pushed_authorization_requests": 1}, {},
     "require_pushed_authorization_requests: Input should be a valid boolean"),
    ("require-signed-not-bool", {"require_signed_request_object": "true"}, {},
     "require_signed_request_object: Input should be a valid boolean"),
    ("require-signed-without-keys", {**SECRET, "require_signed_request_object": True}, {},
     "require_signed_request_object needs jwks or jwks_uri (request objects are verified with "
     "the client's registered keys)"),
    ("alg-without-keys", {**SECRET, "request_object_signing_alg": "ES256"}, {},
     "request_object_signing_alg needs jwks or jwks_uri"),
    ("alg-none", {"request_object_signing_alg": "none"}, {},
     "request_object_signing_alg 'none' is not allowed here (allowed: ES256, EdDSA, PS256)"),
    ("alg-hmac", {"request_object_signing_alg": "HS256"}, {},
     "request_object_signing_alg 'HS256' is not allowed here (allowed: ES256, EdDSA, PS256)"),
    ("alg-not-allowed-here", {"request_object_signing_alg": "PS256"},
     {"allowed_signing_algorithms": ("ES256",)},
     "request_object_signing_alg 'PS256' is not allowed here (allowed: ES256)"),
    ("alg-no-such-key", {"request_object_signing_alg": "EdDSA"}, {},
     "request_object_signing_alg EdDSA: no key in jwks is for that algorithm"),
    ("alg-not-a-string", {"request_object_signing_alg": 256}, {},
     "request_object_signing_alg: Input should be a valid string"),
]
# fmt: on


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return load_vocabulary(None)


@pytest.mark.parametrize(
    ("changes", "overrides", "message"),
    [pytest.param(c, o, m, id=i) for i, c, o, m in REFUSALS],
)
def test_refusals(
    vocabulary: Vocabulary, changes: dict[str, Any], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidClientMetadataError) as caught:
        validate_metadata(metadata(**changes), settings(**overrides), vocabulary)
    assert caught.value.error == "invalid_client_metadata"
    assert caught.value.status_code == 400
    assert caught.value.description == message


def test_accepted_values_are_stored(vocabulary: Vocabulary) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()  # a second key, for the pinned algorithm
    jwks = {"keys": [*JWKS["keys"], {**public_jwk(ed), "kid": "k2", "alg": "EdDSA"}]}
    stored = validate_metadata(
        metadata(
            jwks=jwks,
            require_pushed_authorization_requests=True,
            require_signed_request_object=False,
            request_object_signing_alg="EdDSA",
        ),
        settings(),
        vocabulary,
    )
    assert stored["require_pushed_authorization_requests"] is True
    assert stored["require_signed_request_object"] is False
    assert stored["request_object_signing_alg"] == "EdDSA"


def test_absent_members_are_not_stored(vocabulary: Vocabulary) -> None:
    stored = validate_metadata(metadata(), settings(), vocabulary)
    assert "require_pushed_authorization_requests" not in stored
    assert "require_signed_request_object" not in stored
    assert "request_object_signing_alg" not in stored
