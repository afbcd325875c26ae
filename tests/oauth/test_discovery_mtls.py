"""RFC 8414 members of RFC 8705 appear only where client certificates can reach trustplane."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.tls.pki import Pki, build_pki
from trustplane.oauth.discovery import server_metadata
from trustplane.protocol.scopes import load_vocabulary

MTLS_MEMBERS = {"tls_client_certificate_bound_access_tokens", "mtls_endpoint_aliases"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


def test_no_mtls_members_without_tls_or_proxy(tmp_path: Path) -> None:
    doc = server_metadata(make_settings("sqlite://", tmp_path), load_vocabulary(None))
    assert not MTLS_MEMBERS & doc.keys()
    assert not {"tls_client_auth", "self_signed_tls_client_auth"} & set(
        doc["token_endpoint_auth_methods_supported"]
    )


def test_tls_without_client_ca_publishes_no_mtls_members(pki: Pki, tmp_path: Path) -> None:
    settings = make_settings(
        "sqlite://",
        tmp_path,
        tls_certificate=pki.path("server.crt"),
        tls_key=pki.path("server.key"),
    )
    assert not MTLS_MEMBERS & server_metadata(settings, load_vocabulary(None)).keys()


def test_aliases_at_mtls_base_url(pki: Pki, tmp_path: Path) -> None:
    settings = make_settings(
        "sqlite://",
        tmp_path,
        issuer="https://auth.example.com",
        tls_client_cert_header="x-ssl-client-cert",
        trusted_proxies=("10.0.0.0/8",),
        tls_client_ca=pki.ca_file,
        mtls_base_url="https://mtls.auth.example.com",
        client_auth_methods=("private_key_jwt", "tls_client_auth"),
    )
    doc = server_metadata(settings, load_vocabulary(None))

    assert doc["tls_client_certificate_bound_access_tokens"] is True
    assert doc["mtls_endpoint_aliases"] == {
        "token_endpoint": "https://mtls.auth.example.com/token",
        "introspection_endpoint": "https://mtls.auth.example.com/introspect",
        "revocation_endpoint": "https://mtls.auth.example.com/revoke",
    }
    assert doc["token_endpoint"] == "https://auth.example.com/token"
    assert "tls_client_auth" in doc["token_endpoint_auth_methods_supported"]
