"""RFC 8705 §2.1.2 subject matching, §2.2 key matching, and chain validation against a CA bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from tests.tls.pki import CLIENT_DN, Pki, build_pki
from trustplane.tls.dev_ca import Subject, create_ca, issue
from trustplane.tls.verification import (
    CertificateAuthorities,
    CertificateError,
    public_key_matches,
    subject_matches,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


# (id, field, registered value, matches the client certificate)
# fmt: off
SUBJECTS = [
    ("dn-exact", "tls_client_auth_subject_dn", CLIENT_DN, True),
    ("dn-case-and-spaces", "tls_client_auth_subject_dn", "cn=DESK-7,  o=acme   trading", True),
    ("dn-oid-form", "tls_client_auth_subject_dn", "2.5.4.3=desk-7,2.5.4.10=Acme Trading", True),
    ("dn-hex-escaped-value", "tls_client_auth_subject_dn", "CN=desk\\2D7,O=Acme Trading", True),
    ("dn-other-order", "tls_client_auth_subject_dn", "O=Acme Trading,CN=desk-7", False),
    ("dn-missing-rdn", "tls_client_auth_subject_dn", "CN=desk-7", False),
    ("dn-extra-rdn", "tls_client_auth_subject_dn", "CN=desk-7,O=Acme Trading,C=DE", False),
    ("dn-other-value", "tls_client_auth_subject_dn", "CN=desk-8,O=Acme Trading", False),
    ("dn-prefix-is-not-a-match", "tls_client_auth_subject_dn", "CN=desk-,O=Acme Trading", False),
    ("dn-unparsable", "tls_client_auth_subject_dn", "not a dn", False),
    ("dns-exact", "tls_client_auth_san_dns", "desk-7.acme.example", True),
    ("dns-case-insensitive", "tls_client_auth_san_dns", "DESK-7.Acme.Example", True),
    ("dns-parent-domain", "tls_client_auth_san_dns", "acme.example", False),
    ("dns-cn-is-not-a-san", "tls_client_auth_san_dns", "desk-7", False),
    ("uri-exact", "tls_client_auth_san_uri", "spiffe://acme.example/desk-7", True),
    ("uri-case-differs", "tls_client_auth_san_uri", "spiffe://acme.example/Desk-7", False),
    ("uri-prefix", "tls_client_auth_san_uri", "spiffe://acme.example/", False),
    ("ip-exact", "tls_client_auth_san_ip", "2001:db8::7", True),
    ("ip-binary-equal", "tls_client_auth_san_ip", "2001:0db8:0:0:0:0:0:0007", True),
    ("ip-other", "tls_client_auth_san_ip", "2001:db8::8", False),
    ("ip-malformed", "tls_client_auth_san_ip", "2001:db8::7::1", False),
    ("email-exact", "tls_client_auth_san_email", "Desk-7@Acme.Example", True),
    ("email-domain-case", "tls_client_auth_san_email", "Desk-7@acme.example", True),
    ("email-local-part-case", "tls_client_auth_san_email", "desk-7@Acme.Example", False),
    ("unknown-field", "tls_client_auth_subject", CLIENT_DN, False),
]
# fmt: on


@pytest.mark.parametrize(
    ("field", "value", "expected"), [pytest.param(*row[1:], id=row[0]) for row in SUBJECTS]
)
def test_subject_matching(pki: Pki, field: str, value: str, expected: bool) -> None:
    assert subject_matches(pki.client.certificate, field, value) is expected


def test_san_fields_do_not_match_a_certificate_without_sans(pki: Pki) -> None:
    cert = pki.self_signed.certificate
    assert not subject_matches(cert, "tls_client_auth_san_dns", "desk-7.acme.example")
    assert subject_matches(cert, "tls_client_auth_subject_dn", "CN=self-signed desk")


def test_chain_to_the_bundle_is_valid(pki: Pki) -> None:
    CertificateAuthorities.from_file(pki.ca_file).verify(pki.client.certificate)


def test_certificate_without_san_is_valid_for_dn_matching(pki: Pki) -> None:
    leaf = issue(pki.ca, Subject("no-san", organization="Acme Trading"))
    CertificateAuthorities.from_file(pki.ca_file).verify(leaf.certificate)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other-ca", "chain is not valid"),
        ("self-signed", "chain is not valid"),
        ("server-certificate", "chain is not valid"),
        ("ca-certificate-itself", "chain is not valid"),
    ],
)
def test_chain_refusals(pki: Pki, case: str, message: str) -> None:
    cert = {
        "other-ca": pki.stranger.certificate,
        "self-signed": pki.self_signed.certificate,
        "server-certificate": pki.server.certificate,  # extended key usage serverAuth only
        "ca-certificate-itself": pki.ca.certificate,
    }[case]
    with pytest.raises(CertificateError, match=message):
        CertificateAuthorities.from_file(pki.ca_file).verify(cert)


def test_empty_bundle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no certificate"):
        CertificateAuthorities([])


def test_intermediate_listed_in_the_bundle_is_a_trust_anchor(pki: Pki) -> None:
    other = create_ca("another")
    leaf = issue(other, Subject("x"))
    CertificateAuthorities([pki.ca.certificate, other.certificate]).verify(leaf.certificate)


def test_public_key_matching(pki: Pki) -> None:
    cert = pki.self_signed.certificate
    assert public_key_matches(cert, [pki.self_signed.key.public_key()])  # type: ignore[list-item]
    assert not public_key_matches(cert, [pki.client.key.public_key()])  # type: ignore[list-item]
    assert not public_key_matches(cert, [])


def test_verified_chain_is_remembered_only_until_not_after(pki: Pki) -> None:
    """The cache of validated chains never outlives the certificate."""
    import datetime
    import time

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    short = (
        x509.CertificateBuilder()
        .subject_name(Subject("short-lived").name())
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(seconds=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(pki.ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    authorities = CertificateAuthorities.from_file(pki.ca_file)
    authorities.verify(short)
    authorities.verify(short)  # remembered

    time.sleep(2.5)  # notAfter is inclusive to the second (RFC 5280 §4.1.2.5): 1.5 s past it
    with pytest.raises(CertificateError, match="chain is not valid"):
        authorities.verify(short)


def test_failures_are_not_remembered(pki: Pki) -> None:
    authorities = CertificateAuthorities.from_file(pki.ca_file)
    for _ in range(2):
        with pytest.raises(CertificateError):
            authorities.verify(pki.stranger.certificate)
