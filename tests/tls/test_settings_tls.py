"""TLS and proxy settings: every inconsistent combination is one line naming the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tls.pki import Pki, build_pki
from trustplane.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("TRUSTPLANE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


MTLS = '["private_key_jwt", "tls_client_auth"]'

# (id, settings (values "{cert}", "{key}", "{ca}" filled in), message pattern)
# fmt: off
REFUSALS = [
    ("certificate-without-key", {"tls_certificate": "{cert}"}, r"^invalid setting TRUSTPLANE_TLS_CERTIFICATE: tls_certificate and tls_key go together$"),
    ("key-without-certificate", {"tls_key": "{key}"}, r"^invalid setting TRUSTPLANE_TLS_CERTIFICATE: tls_certificate and tls_key go together$"),
    ("missing-file", {"tls_certificate": "/nonexistent.crt", "tls_key": "{key}"}, r"^invalid setting TRUSTPLANE_TLS_CERTIFICATE: Value error, /nonexistent.crt is not a readable file$"),
    ("client-ca-without-tls", {"tls_client_ca": "{ca}"}, r"^invalid setting TRUSTPLANE_TLS_CLIENT_CA: needs tls_certificate or tls_client_cert_header$"),
    ("header-without-proxies", {"tls_client_cert_header": "X-Client-Cert"}, r"^invalid setting TRUSTPLANE_TRUSTED_PROXIES: tls_client_cert_header and trusted_proxies go together$"),
    ("proxies-without-header", {"trusted_proxies": '["10.0.0.0/8"]'}, r"^invalid setting TRUSTPLANE_TRUSTED_PROXIES: tls_client_cert_header and trusted_proxies go together$"),
    ("proxy-not-a-network", {"tls_client_cert_header": "X-Client-Cert", "trusted_proxies": '["10.0.0.1/8"]'}, r"^invalid setting TRUSTPLANE_TRUSTED_PROXIES: Value error, '10.0.0.1/8' is not a network"),
    ("header-name-with-colon", {"tls_client_cert_header": "X-Cert:", "trusted_proxies": '["10.0.0.0/8"]'}, r"^invalid setting TRUSTPLANE_TLS_CLIENT_CERT_HEADER: String should match pattern"),
    ("mtls-method-without-certificates", {"client_auth_methods": MTLS}, r"^invalid setting TRUSTPLANE_CLIENT_AUTH_METHODS: tls_client_auth needs client certificates"),
    ("tls-without-client-ca-has-no-certificates", {"tls_certificate": "{cert}", "tls_key": "{key}", "client_auth_methods": '["self_signed_tls_client_auth"]'}, r"^invalid setting TRUSTPLANE_CLIENT_AUTH_METHODS: self_signed_tls_client_auth needs client certificates"),
    ("tls-client-auth-without-ca", {"tls_client_cert_header": "X-Client-Cert", "trusted_proxies": '["10.0.0.0/8"]', "client_auth_methods": MTLS}, r"^invalid setting TRUSTPLANE_CLIENT_AUTH_METHODS: tls_client_auth needs tls_client_ca$"),
    ("mtls-base-url-http", {"mtls_base_url": "http://mtls.example"}, r"^invalid setting TRUSTPLANE_MTLS_BASE_URL: Value error, must be an https URL"),
]
# fmt: on


def fill(pki: Pki, values: dict[str, str]) -> dict[str, str]:
    paths = {"{cert}": "server.crt", "{key}": "server.key", "{ca}": "ca.crt"}
    return {k: str(pki.path(paths[v])) if v in paths else v for k, v in values.items()}


@pytest.mark.parametrize(("values", "message"), [pytest.param(*r[1:], id=r[0]) for r in REFUSALS])
def test_refusals(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, values: dict[str, str], message: str
) -> None:
    for name, value in fill(pki, values).items():
        monkeypatch.setenv(f"TRUSTPLANE_{name.upper()}", value)
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings()
    assert "\n" not in str(caught.value)


def test_tls_makes_the_default_issuer_https(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTPLANE_TLS_CERTIFICATE", str(pki.path("server.crt")))
    monkeypatch.setenv("TRUSTPLANE_TLS_KEY", str(pki.path("server.key")))
    settings = load_settings(port=8443)

    assert settings.issuer == "https://127.0.0.1:8443"
    assert settings.tls_enabled
    assert not settings.mtls_enabled  # no client CA: no client certificates


def test_proxy_mode(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTPLANE_TLS_CLIENT_CERT_HEADER", "X-SSL-Client-Cert")
    monkeypatch.setenv("TRUSTPLANE_TRUSTED_PROXIES", '["10.0.0.0/8", "fd00::/8"]')
    monkeypatch.setenv("TRUSTPLANE_TLS_CLIENT_CA", str(pki.ca_file))
    monkeypatch.setenv("TRUSTPLANE_CLIENT_AUTH_METHODS", MTLS)
    settings = load_settings()

    assert settings.proxy_mode
    assert settings.mtls_enabled
    assert not settings.tls_enabled
    assert settings.issuer.startswith("http://")


def test_defaults_have_no_tls() -> None:
    settings = load_settings()
    assert not settings.tls_enabled
    assert not settings.proxy_mode
    assert not settings.mtls_enabled
