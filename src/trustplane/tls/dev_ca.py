"""A private CA and its certificates, for trying mutual TLS (``trustplane dev ca``) and for tests.

Not for production: the CA key is a file next to the certificates. Server certificates get an RSA
key (the FAPI 2.0 TLS 1.2 cipher suites are all ``*_RSA_*``); client certificates an EC P-256 key.
Every certificate carries the extensions RFC 5280 path validation expects (basic constraints, key
usage, extended key usage, subject and authority key identifiers), so ``cryptography``'s verifier,
OpenSSL, nginx and curl all accept the chain.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustplane.jose.jwk import PrivateKey

CA_LIFETIME = datetime.timedelta(days=365)
LEAF_LIFETIME = datetime.timedelta(days=90)
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Subject:
    """What a certificate names: a common name (the subject DN is ``CN=...[,O=...]``) and SANs."""

    common_name: str
    organization: str | None = None
    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()

    def name(self) -> x509.Name:
        """Most general first (DER order), so the RFC 4514 string reads ``CN=...,O=...``."""
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, self.common_name)]
        if self.organization:
            attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization))
        return x509.Name(attrs)

    def sans(self) -> list[x509.GeneralName]:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns]
        names += [x509.UniformResourceIdentifier(u) for u in self.uris]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in self.ips]
        names += [x509.RFC822Name(e) for e in self.emails]
        return names


@dataclass(frozen=True, slots=True)
class Issued:
    key: PrivateKey
    certificate: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert_pem(self) -> bytes:
        certs = [self.certificate, *self.chain]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``STEM.crt`` and ``STEM.key`` (mode 0600) in ``directory``."""
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem())
        key_path.touch(mode=0o600)
        key_path.chmod(0o600)  # also when an existing file is overwritten
        key_path.write_bytes(self.key_pem())
        return cert_path, key_path


def create_ca(common_name: str = "trustplane dev CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key(), CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(ca: Issued, subject: Subject, *, server: bool = False, rsa_key: bool = False) -> Issued:
    """A leaf certificate signed by ``ca``: for TLS clients, or (``server``) for a TLS server."""
    key: PrivateKey = (
        rsa.generate_private_key(65537, 2048)
        if rsa_key or server
        else ec.generate_private_key(ec.SECP256R1())
    )
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(subject.name(), ca.certificate.subject, key.public_key(), LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if subject.sans():
        builder = builder.add_extension(x509.SubjectAlternativeName(subject.sans()), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def self_signed(subject: Subject) -> Issued:
    """A self-signed client certificate (RFC 8705 §2.2 ``self_signed_tls_client_auth``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(subject.name(), subject.name(), key.public_key(), LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if subject.sans():
        builder = builder.add_extension(x509.SubjectAlternativeName(subject.sans()), critical=False)
    return Issued(key, builder.sign(key, hashes.SHA256()))


def load(cert_path: Path, key_path: Path) -> Issued:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{key_path}: not an EC or RSA private key")
    return Issued(key, cert)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: object, lifetime: datetime.timedelta
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
