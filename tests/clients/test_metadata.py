"""RFC 7591 client metadata validation: one row per refusal, each with its exact error code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLEARING, EXECUTION, LEI, jwks_for, make_settings, new_ec_key
from trustplane.clients.metadata import validate_metadata
from trustplane.errors import InvalidClientMetadataError, InvalidRedirectUriError, OAuth2Error
from trustplane.protocol.scopes import Vocabulary, load_vocabulary
from trustplane.settings import Settings

JWKS = jwks_for(new_ec_key())
PRIVATE_JWKS = {"keys": [{**JWKS["keys"][0], "d": "c2VjcmV0"}]}
DELETE = object()


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return load_vocabulary(None)


def settings(**overrides: Any) -> Settings:
    return make_settings("sqlite+aiosqlite:///:memory:", Path("unused"), **overrides)


def metadata(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "client_name": "desk 7",
        "lei": LEI,
        "scope": "order:create order:cancel",
        "allowed_resources": [EXECUTION],
        "jwks": JWKS,
    }
    for name, value in changes.items():
        if value is DELETE:
            raw.pop(name, None)
        else:
            raw[name] = value
    return raw


SECRET = {"token_endpoint_auth_method": "client_secret_basic", "jwks": DELETE}
META = InvalidClientMetadataError
REDIRECT = InvalidRedirectUriError

# (id, changes to the valid metadata, settings overrides, error class, description pattern)
# fmt: off
REFUSALS: list[tuple[str, dict[str, Any], dict[str, Any], type[OAuth2Error], str]] = [
    # keys
    ("jwks-private-member", {"jwks": PRIVATE_JWKS}, {}, META, "^jwks: jwks must not contain private"),
    ("jwks-empty-keys", {"jwks": {"keys": []}}, {}, META, "^jwks: jwks must be an object with a non-empty"),
    ("jwks-use-enc", {"jwks": {"keys": [{**JWKS["keys"][0], "use": "enc"}]}}, {}, META, "^jwks: key use must be 'sig'$"),
    ("jwks-and-jwks-uri", {"jwks_uri": "https://client.example/jwks"}, {}, META, "^jwks and jwks_uri must not both be present$"),
    ("private-key-jwt-without-keys", {"jwks": DELETE}, {}, META, "^private_key_jwt needs jwks or jwks_uri$"),
    ("private-key-jwt-empty-jwks", {"jwks": {}}, {}, META, "^private_key_jwt needs jwks or jwks_uri$"),
    ("secret-client-with-jwks", {**SECRET, "jwks": JWKS}, {}, META, "^a client_secret client must not register keys$"),
    ("secret-client-with-jwks-uri", {**SECRET, "jwks_uri": "https://client.example/jwks"}, {}, META, "^a client_secret client must not register keys$"),
    ("secret-post-client-with-jwks", {"token_endpoint_auth_method": "client_secret_post"}, {}, META, "^a client_secret client must not register keys$"),
    # jwks_uri
    ("jwks-uri-http", {"jwks": DELETE, "jwks_uri": "http://client.example/jwks"}, {}, META, "^jwks_uri must be an https URL$"),
    ("jwks-uri-http-loopback-not-allowed", {"jwks": DELETE, "jwks_uri": "http://127.0.0.1:9000/jwks"}, {}, META, "^jwks_uri must be an https URL$"),
    ("jwks-uri-http-non-loopback-even-if-allowed", {"jwks": DELETE, "jwks_uri": "http://client.example/jwks"}, {"allow_insecure_loopback_jwks_uri": True}, META, "^jwks_uri must be an https URL$"),
    ("jwks-uri-relative", {"jwks": DELETE, "jwks_uri": "/jwks"}, {}, META, "^jwks_uri must be an https URL$"),
    ("jwks-uri-fragment", {"jwks": DELETE, "jwks_uri": "https://client.example/jwks#k"}, {}, META, "^jwks_uri must be an absolute URL without fragment$"),
    ("jwks-uri-no-host", {"jwks": DELETE, "jwks_uri": "https:///jwks"}, {}, META, "^jwks_uri must be an absolute URL without fragment$"),
    ("jwks-uri-bad-port", {"jwks": DELETE, "jwks_uri": "https://client.example:99999/jwks"}, {}, META, "^jwks_uri must be a valid URL$"),
    # redirect URIs
    ("redirect-http-non-loopback", {"redirect_uris": ["http://client.example/cb"]}, {}, REDIRECT, "^redirect_uris must use https"),
    ("redirect-http-localhost", {"redirect_uris": ["http://localhost:8080/cb"]}, {}, REDIRECT, "^redirect_uris must use https \\(http only on 127.0.0.1 or \\[::1\\]\\)$"),
    ("redirect-http-127-0-0-2", {"redirect_uris": ["http://127.0.0.2/cb"]}, {}, REDIRECT, "^redirect_uris must use https"),
    ("redirect-custom-scheme", {"redirect_uris": ["com.example.app://cb"]}, {}, REDIRECT, "^redirect_uris must use https"),
    ("redirect-fragment", {"redirect_uris": ["https://client.example/cb#done"]}, {}, REDIRECT, "^redirect_uris must not contain a fragment$"),
    ("redirect-empty-fragment", {"redirect_uris": ["https://client.example/cb#"]}, {}, REDIRECT, "^redirect_uris must not contain a fragment$"),
    ("redirect-wildcard-host", {"redirect_uris": ["https://*.client.example/cb"]}, {}, REDIRECT, "^redirect_uris must not contain wildcards$"),
    ("redirect-wildcard-path", {"redirect_uris": ["https://client.example/*"]}, {}, REDIRECT, "^redirect_uris must not contain wildcards$"),
    ("redirect-relative", {"redirect_uris": ["/cb"]}, {}, REDIRECT, "^redirect_uris must be absolute URIs$"),
    ("redirect-no-host", {"redirect_uris": ["https:///cb"]}, {}, REDIRECT, "^redirect_uris must be absolute URIs$"),
    ("redirect-port-too-large", {"redirect_uris": ["https://client.example:65536/cb"]}, {}, REDIRECT, "^redirect_uris must be valid absolute URIs$"),
    ("redirect-port-not-numeric", {"redirect_uris": ["https://client.example:https/cb"]}, {}, REDIRECT, "^redirect_uris must be valid absolute URIs$"),
    ("redirect-query-code", {"redirect_uris": ["https://client.example/cb?code=1"]}, {}, REDIRECT, "^redirect_uris: the query must not hold code: the authorization response adds it$"),
    ("redirect-query-state-empty", {"redirect_uris": ["https://client.example/cb?tenant=a&state="]}, {}, REDIRECT, "^redirect_uris: the query must not hold state: "),
    ("redirect-query-iss-encoded", {"redirect_uris": ["https://client.example/cb?%69ss=x"]}, {}, REDIRECT, "^redirect_uris: the query must not hold iss: "),
    ("redirect-query-error-two", {"redirect_uris": ["https://client.example/cb?error_description=x&error"]}, {}, REDIRECT, "^redirect_uris: the query must not hold error, error_description: "),
    ("redirect-query-error-uri", {"redirect_uris": ["http://127.0.0.1:8080/cb?a=1&error_uri=x"]}, {}, REDIRECT, "^redirect_uris: the query must not hold error_uri: "),
    ("redirect-trailing-newline", {"redirect_uris": ["https://client.example/cb\n"]}, {}, REDIRECT, "^redirect_uris must not contain whitespace or control characters$"),
    ("redirect-second-of-two-bad", {"redirect_uris": ["https://client.example/cb", "http://client.example/cb"]}, {}, REDIRECT, "^redirect_uris must use https"),
    # LEI
    ("lei-bad-check-digits", {"lei": LEI[:-2] + "13"}, {}, META, "^lei: not a valid ISO 17442 LEI"),
    ("lei-too-short", {"lei": LEI[:-1]}, {}, META, "^lei: not a valid ISO 17442 LEI"),
    ("lei-too-long", {"lei": LEI + "0"}, {}, META, "^lei: not a valid ISO 17442 LEI"),
    ("lei-bad-charset", {"lei": LEI[:4] + "!" + LEI[5:]}, {}, META, "^lei: not a valid ISO 17442 LEI"),
    ("lei-empty", {"lei": ""}, {}, META, "^lei: not a valid ISO 17442 LEI"),
    ("lei-missing", {"lei": DELETE}, {}, META, "^lei: Field required$"),
    # scopes, resources, grants
    ("unknown-scope", {"scope": "order:create position:close"}, {}, META, "^scope: not in the vocabulary: position:close$"),
    ("generic-scope", {"scope": "read"}, {}, META, "^scope: not in the vocabulary: read$"),
    ("empty-scope", {"scope": ""}, {}, META, "^scope: String should have at least 1 character$"),
    ("unknown-resource", {"allowed_resources": [EXECUTION, "https://unknown.example/api"]}, {}, META, "^allowed_resources: unknown resource\\(s\\): https://unknown.example/api$"),
    ("unknown-introspection-resource", {"introspection_resources": ["https://unknown.example/api"]}, {}, META, "^introspection_resources: unknown resource\\(s\\)"),
    ("no-resources", {"allowed_resources": []}, {}, META, "^allowed_resources: List should have at least 1 item"),
    ("unsupported-grant", {"grant_types": ["client_credentials", "password"]}, {}, META, "^unsupported grant_types: password$"),
    ("authorization-code-without-redirect-uris", {"grant_types": ["authorization_code"]}, {}, META, "^the authorization_code grant needs redirect_uris$"),
    ("refresh-token-without-authorization-code", {"grant_types": ["client_credentials", "refresh_token"]}, {}, META, "^refresh_token is only issued with authorization_code$"),
    ("response-types-other-than-code", {"grant_types": ["authorization_code"], "redirect_uris": ["https://client.example/cb"], "response_types": ["code", "token"]}, {}, META, "^response_types: only 'code' is supported$"),
    ("empty-grants", {"grant_types": []}, {}, META, "^grant_types must not be empty$"),
    ("response-types-without-code-grant", {"response_types": ["code"]}, {}, META, "^response_types need the authorization_code grant$"),
    # auth methods
    ("auth-method-not-enabled", SECRET, {"client_auth_methods": ("private_key_jwt",)}, META, "^token_endpoint_auth_method 'client_secret_basic' is not enabled here$"),
    ("auth-method-none", {"token_endpoint_auth_method": "none"}, {}, META, "^token_endpoint_auth_method: Input should be"),
    ("auth-method-tls-not-enabled", {"token_endpoint_auth_method": "tls_client_auth"}, {}, META, "^token_endpoint_auth_method 'tls_client_auth' is not enabled here$"),
    # JSON types
    ("scope-as-list", {"scope": ["order:create"]}, {}, META, "^scope: Input should be a valid string$"),
    ("lei-as-number", {"lei": 5493001}, {}, META, "^lei: Input should be a valid string$"),
    ("client-name-as-number", {"client_name": 7}, {}, META, "^client_name: Input should be a valid string$"),
    ("resources-as-string", {"allowed_resources": EXECUTION}, {}, META, "^allowed_resources: Input should be a valid list$"),
    ("resource-as-number", {"allowed_resources": [1]}, {}, META, "^allowed_resources.0: Input should be a valid string$"),
    ("grant-types-as-string", {"grant_types": "client_credentials"}, {}, META, "^grant_types: Input should be a valid list$"),
    ("redirect-uris-as-string", {"redirect_uris": "https://client.example/cb"}, {}, META, "^redirect_uris: Input should be a valid list$"),
    ("jwks-as-list", {"jwks": JWKS["keys"]}, {}, META, "^jwks: Input should be a valid dictionary"),
    ("jwks-uri-as-object", {"jwks": DELETE, "jwks_uri": {"url": "https://x"}}, {}, META, "^jwks_uri: Input should be a valid string$"),
    ("jwk-crv-as-list", {"jwks": {"keys": [{**JWKS["keys"][0], "crv": ["P-256"]}]}}, {}, META, "^jwks: unsupported key type 'EC'"),
    ("too-many-resources", {"allowed_resources": [EXECUTION] * 33}, {}, META, "^allowed_resources: List should have at most 32 items"),
    ("client-name-too-long", {"client_name": "x" * 201}, {}, META, "^client_name: String should have at most 200 characters$"),
]
# fmt: on


@pytest.mark.parametrize(
    ("changes", "overrides", "error", "message"),
    [pytest.param(*row[1:], id=row[0]) for row in REFUSALS],
)
def test_refusals(
    vocabulary: Vocabulary,
    changes: dict[str, Any],
    overrides: dict[str, Any],
    error: type[OAuth2Error],
    message: str,
) -> None:
    with pytest.raises(OAuth2Error, match=message) as caught:
        validate_metadata(metadata(**changes), settings(**overrides), vocabulary)

    assert type(caught.value) is error
    expected_code = "invalid_redirect_uri" if error is REDIRECT else "invalid_client_metadata"
    assert caught.value.error == expected_code
    assert caught.value.status_code == 400
    assert caught.value.body()["error"] == expected_code


@pytest.mark.parametrize("body", [[], "metadata", None, 42, [metadata()]])
def test_body_must_be_a_json_object(vocabulary: Vocabulary, body: Any) -> None:
    with pytest.raises(
        InvalidClientMetadataError, match=r"^the request body must be a JSON object$"
    ):
        validate_metadata(body, settings(), vocabulary)


# --------------------------------------------------------------------------- accepted


def test_minimal_private_key_jwt_client_is_normalised(vocabulary: Vocabulary) -> None:
    raw = metadata(client_name=DELETE, software_id="ignored", logo_uri="https://x.example/l.png")

    assert validate_metadata(raw, settings(), vocabulary) == {
        "lei": LEI,
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": JWKS,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "scope": "order:create order:cancel",
        "allowed_resources": [EXECUTION],
        "redirect_uris": [],
        "authorization_details_types": [],
    }


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_secret_client_without_keys_is_accepted(vocabulary: Vocabulary, method: str) -> None:
    out = validate_metadata(
        metadata(token_endpoint_auth_method=method, jwks=DELETE), settings(), vocabulary
    )

    assert out["token_endpoint_auth_method"] == method
    assert "jwks" not in out
    assert "jwks_uri" not in out


def test_full_metadata_is_kept(vocabulary: Vocabulary) -> None:
    raw = metadata(
        scope="order:create settlement:submit",
        allowed_resources=[EXECUTION, CLEARING],
        redirect_uris=[
            "https://client.example/cb?x=1",
            "https://client.example/cb?Code=1&states=2&codes",  # not what the response adds
            "http://127.0.0.1:8080/cb",
            "http://[::1]/cb",
            "https://client.example:8443/cb",
        ],
    )

    out = validate_metadata(raw, settings(), vocabulary)

    assert out["client_name"] == "desk 7"
    assert out["allowed_resources"] == [EXECUTION, CLEARING]
    assert out["redirect_uris"] == raw["redirect_uris"]
    assert "resource_server_for" not in out


# --------------------------------------------------------------------------- operator-only rights

RS_FIELDS = ["resource_server_for", "introspection_resources"]


@pytest.mark.parametrize("field", RS_FIELDS)
def test_registration_cannot_make_a_client_a_resource_server(
    vocabulary: Vocabulary, field: str
) -> None:
    """Trust boundary: rights over other parties' tokens are the operator's to grant."""
    with pytest.raises(InvalidClientMetadataError) as caught:
        validate_metadata(metadata(**{field: [EXECUTION]}), settings(), vocabulary)

    assert caught.value.error == "invalid_client_metadata"
    assert caught.value.description.startswith(f"{field}: rights over other parties' tokens")
    assert "trustplane clients add --resource-server" in caught.value.description


@pytest.mark.parametrize("field", RS_FIELDS)
def test_an_empty_resource_server_list_grants_nothing_and_is_accepted(
    vocabulary: Vocabulary, field: str
) -> None:
    out = validate_metadata(metadata(**{field: []}), settings(), vocabulary)

    assert "resource_server_for" not in out
    assert "introspection_resources" not in out


@pytest.mark.parametrize("field", RS_FIELDS)
def test_the_operator_grants_the_resource_server_role_under_one_name(
    vocabulary: Vocabulary, field: str
) -> None:
    out = validate_metadata(
        metadata(**{field: [EXECUTION, EXECUTION]}), settings(), vocabulary, operator=True
    )

    assert out["resource_server_for"] == [EXECUTION]
    assert "introspection_resources" not in out


def test_https_jwks_uri_is_accepted(vocabulary: Vocabulary) -> None:
    raw = metadata(jwks=DELETE, jwks_uri="https://client.example/.well-known/jwks.json")

    out = validate_metadata(raw, settings(), vocabulary)

    assert out["jwks_uri"] == "https://client.example/.well-known/jwks.json"
    assert "jwks" not in out


@pytest.mark.parametrize(
    "uri", ["http://127.0.0.1:9000/jwks", "http://[::1]:9000/jwks", "http://localhost:9000/jwks"]
)
def test_http_loopback_jwks_uri_only_when_allowed(vocabulary: Vocabulary, uri: str) -> None:
    raw = metadata(jwks=DELETE, jwks_uri=uri)

    allowed = validate_metadata(raw, settings(allow_insecure_loopback_jwks_uri=True), vocabulary)

    assert allowed["jwks_uri"] == uri
    with pytest.raises(InvalidClientMetadataError, match=r"^jwks_uri must be an https URL$"):
        validate_metadata(raw, settings(), vocabulary)


def test_valid_lei_in_fixture_passes_and_a_neighbour_fails(vocabulary: Vocabulary) -> None:
    """The check digits are what decides: changing one character of a valid LEI is refused."""
    assert validate_metadata(metadata(), settings(), vocabulary)["lei"] == LEI
    with pytest.raises(InvalidClientMetadataError):
        validate_metadata(metadata(lei="5493001KJTIIGC8Y1R02"), settings(), vocabulary)
