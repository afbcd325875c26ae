"""RFC 8705 client metadata: §2.1.2 (exactly one expected subject value for ``tls_client_auth``, and
none for any other method), §2.2 (a self-signed client registers its keys), §3.4 (certificate-bound
tokens only where this server offers mutual TLS). Each refusal is ``invalid_client_metadata``."""

from __future__ import annotations

from typing import Any

import pytest

from tests.clients.test_metadata import JWKS, metadata, settings
from tests.tls.pki import CLIENT_DN, build_pki
from trustplane.clients.metadata import validate_metadata
from trustplane.errors import InvalidClientMetadataError
from trustplane.protocol.scopes import Vocabulary, load_vocabulary
from trustplane.settings import Settings

TLS = {"token_endpoint_auth_method": "tls_client_auth", "jwks": None}
SELF = {"token_endpoint_auth_method": "self_signed_tls_client_auth"}
MTLS_METHODS = ("private_key_jwt", "tls_client_auth", "self_signed_tls_client_auth")


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return load_vocabulary(None)


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    pki = build_pki(tmp_path_factory.mktemp("pki"))
    return settings(
        client_auth_methods=MTLS_METHODS,
        tls_client_ca=pki.ca_file,
        tls_client_cert_header="x-client-cert",
        trusted_proxies=("10.0.0.0/8",),
    )


def raw(**changes: Any) -> dict[str, Any]:
    out = metadata(**{k: v for k, v in changes.items() if v is not None})
    for name in [k for k, v in changes.items() if v is None]:
        out.pop(name, None)
    return out


# (id, metadata changes, description pattern)
# fmt: off
REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("tls-no-subject", TLS, "^tls_client_auth needs exactly one of tls_client_auth_subject_dn, "),
    ("tls-two-subjects", {**TLS, "tls_client_auth_subject_dn": CLIENT_DN, "tls_client_auth_san_dns": "a.example"},
     r"\(got tls_client_auth_subject_dn, tls_client_auth_san_dns\)$"),
    ("tls-dn-not-rfc4514", {**TLS, "tls_client_auth_subject_dn": "desk 7 of Acme"}, "^tls_client_auth_subject_dn: not an RFC 4514 distinguished name$"),
    ("tls-dn-empty", {**TLS, "tls_client_auth_subject_dn": ""}, "^tls_client_auth_subject_dn: String should have at least 1 character$"),
    ("tls-ip-not-an-address", {**TLS, "tls_client_auth_san_ip": "10.0.0.300"}, "^tls_client_auth_san_ip: not an IPv4 or IPv6 address$"),
    ("tls-ip-cidr", {**TLS, "tls_client_auth_san_ip": "10.0.0.0/8"}, "^tls_client_auth_san_ip: not an IPv4 or IPv6 address$"),
    ("tls-dns-wildcard", {**TLS, "tls_client_auth_san_dns": "*.acme.example"}, "^tls_client_auth_san_dns: not a DNS name$"),
    ("tls-dns-with-space", {**TLS, "tls_client_auth_san_dns": "acme .example"}, "^tls_client_auth_san_dns: not a DNS name$"),
    ("tls-uri-relative", {**TLS, "tls_client_auth_san_uri": "/desk-7"}, "^tls_client_auth_san_uri: not an absolute URI$"),
    ("tls-email-without-at", {**TLS, "tls_client_auth_san_email": "desk-7.acme.example"}, "^tls_client_auth_san_email: not an email address$"),
    ("tls-subject-as-number", {**TLS, "tls_client_auth_san_ip": 167772161}, "^tls_client_auth_san_ip: Input should be a valid string$"),
    ("subject-on-private-key-jwt", {"tls_client_auth_subject_dn": CLIENT_DN}, "^tls_client_auth_subject_dn applies to tls_client_auth only$"),
    ("subject-on-self-signed", {**SELF, "tls_client_auth_san_dns": "a.example"}, "^tls_client_auth_san_dns applies to tls_client_auth only$"),
    ("self-signed-without-keys", {**SELF, "jwks": None}, "^self_signed_tls_client_auth needs jwks or jwks_uri$"),
    ("bound-tokens-as-string", {"tls_client_certificate_bound_access_tokens": "true"}, "^tls_client_certificate_bound_access_tokens: Input should be a valid boolean$"),
]
# fmt: on


@pytest.mark.parametrize(
    ("changes", "message"), [pytest.param(*row[1:], id=row[0]) for row in REFUSALS]
)
def test_refusals(
    vocabulary: Vocabulary, mtls: Settings, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidClientMetadataError, match=message) as caught:
        validate_metadata(raw(**changes), mtls, vocabulary)
    assert caught.value.error == "invalid_client_metadata"
    assert caught.value.status_code == 400


@pytest.mark.parametrize("method", ["tls_client_auth", "self_signed_tls_client_auth"])
def test_mtls_methods_need_the_deployment_to_enable_them(
    vocabulary: Vocabulary, method: str
) -> None:
    changes = {"token_endpoint_auth_method": method, "tls_client_auth_subject_dn": CLIENT_DN}
    with pytest.raises(
        InvalidClientMetadataError,
        match=f"^token_endpoint_auth_method '{method}' is not enabled here$",
    ):
        validate_metadata(raw(**changes), settings(), vocabulary)


def test_bound_tokens_need_mutual_tls_here(vocabulary: Vocabulary) -> None:
    with pytest.raises(
        InvalidClientMetadataError,
        match=r"^tls_client_certificate_bound_access_tokens: this server does not offer mutual TLS$",
    ):
        validate_metadata(
            raw(tls_client_certificate_bound_access_tokens=True), settings(), vocabulary
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tls_client_auth_subject_dn", "cn=desk-7, o=Acme Trading"),
        ("tls_client_auth_san_dns", "desk-7.acme.example"),
        ("tls_client_auth_san_uri", "spiffe://acme.example/desk-7"),
        ("tls_client_auth_san_ip", "2001:db8::7"),
        ("tls_client_auth_san_email", "desk-7@acme.example"),
    ],
)
def test_tls_client_auth_is_stored_as_registered(
    vocabulary: Vocabulary, mtls: Settings, field: str, value: str
) -> None:
    stored = validate_metadata(raw(**TLS, **{field: value}), mtls, vocabulary)

    assert stored["token_endpoint_auth_method"] == "tls_client_auth"
    assert stored[field] == value
    assert "jwks" not in stored


def test_self_signed_client_with_binding_flag(vocabulary: Vocabulary, mtls: Settings) -> None:
    stored = validate_metadata(
        raw(**SELF, tls_client_certificate_bound_access_tokens=True), mtls, vocabulary
    )
    assert stored["tls_client_certificate_bound_access_tokens"] is True
    assert stored["jwks"] == JWKS


def test_private_key_jwt_client_may_ask_for_bound_tokens(
    vocabulary: Vocabulary, mtls: Settings
) -> None:
    stored = validate_metadata(
        raw(tls_client_certificate_bound_access_tokens=True), mtls, vocabulary
    )
    assert stored["tls_client_certificate_bound_access_tokens"] is True
