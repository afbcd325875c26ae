"""``trustplane dev ca``: the private CA for trying mutual TLS. The certificates it makes must pass
the same checks trustplane applies to real ones (chain to the CA, RFC 8705 subject matching)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from tests.cli.conftest import invoke, one_line
from trustplane.tls.verification import CertificateAuthorities, subject_matches


def test_create_then_issue_client_and_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = tmp_path / "certs"
    created = invoke(tmp_path, "dev", "ca", "create", "--out", str(certs), monkeypatch=monkeypatch)
    client = invoke(
        tmp_path, "dev", "ca", "issue", "--out", str(certs), "--name", "desk-7",
        "--organization", "Acme Trading", "--dns", "desk-7.acme.example", "--json",
        monkeypatch=monkeypatch,
    )  # fmt: skip
    server = invoke(
        tmp_path, "dev", "ca", "issue", "--out", str(certs), "--name", "localhost", "--server",
        "--ip", "127.0.0.1", "--json", monkeypatch=monkeypatch,
    )  # fmt: skip

    assert created.returncode == client.returncode == server.returncode == 0
    body = json.loads(client.stdout)
    assert body["subject_dn"] == "CN=desk-7,O=Acme Trading"
    assert len(body["x5t#S256"]) == 43
    assert stat.S_IMODE((certs / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((certs / "desk-7.key").stat().st_mode) == 0o600
    authorities = CertificateAuthorities.from_file(certs / "ca.crt")
    cert = x509.load_pem_x509_certificate((certs / "desk-7.crt").read_bytes())
    authorities.verify(cert)
    assert subject_matches(cert, "tls_client_auth_san_dns", "desk-7.acme.example")
    server_cert = x509.load_pem_x509_certificate((certs / "localhost.crt").read_bytes())
    assert server_cert.public_key().key_size == 2048  # type: ignore[union-attr]  # RSA: FAPI TLS 1.2


def test_self_signed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke(
        tmp_path, "dev", "ca", "issue", "--out", str(tmp_path), "--name", "solo", "--self-signed",
        "--json", monkeypatch=monkeypatch,
    )  # fmt: skip
    cert = x509.load_pem_x509_certificate((tmp_path / "solo.crt").read_bytes())

    assert result.returncode == 0
    assert cert.issuer == cert.subject


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["issue", "--name", "x"], "no CA in "),
        (["issue", "--name", "x", "--server", "--self-signed"], "exclude each other"),
        (["issue", "--name", "x", "--self-signed", "--ip", "10.0.0.300"], "is not an IP address"),
    ],
)
def test_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    result = invoke(tmp_path, "dev", "ca", *args, "--out", str(tmp_path), monkeypatch=monkeypatch)
    assert message in one_line(result)


def test_existing_files_are_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    invoke(tmp_path, "dev", "ca", "create", "--out", str(tmp_path), monkeypatch=monkeypatch)
    before = (tmp_path / "ca.key").read_bytes()

    again = invoke(tmp_path, "dev", "ca", "create", "--out", str(tmp_path), monkeypatch=monkeypatch)
    forced = invoke(
        tmp_path, "dev", "ca", "create", "--out", str(tmp_path), "--force", monkeypatch=monkeypatch
    )

    assert "already exist" in one_line(again)
    assert forced.returncode == 0
    assert (tmp_path / "ca.key").read_bytes() != before
