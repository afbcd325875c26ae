"""RFC 8705 §2 checks on a client certificate. Framework-free.

``tls_client_auth`` (§2.1): the certificate chains to one of the CAs of ``tls_client_ca`` (path
validation by ``cryptography``'s RFC 5280 verifier, at the time of the request; every certificate
of the bundle is a trust anchor, so an intermediate CA may be listed instead of its root), and the
one subject value the client registered (§2.1.2) is in it:

* ``tls_client_auth_subject_dn``: the subject DN equals the registered RFC 4514 string *as a name*:
  the same RDNs in the same order with the same attribute types, values compared case-insensitively
  with insignificant spaces removed (RFC 4517 caseIgnoreMatch) — ``cn=Acme,  o=ACME Corp`` matches
  ``CN=acme,O=Acme Corp``; a different order or an extra RDN does not;
* ``tls_client_auth_san_dns``: a dNSName entry, case-insensitively (DNS names are);
* ``tls_client_auth_san_uri``: a uniformResourceIdentifier entry, exactly;
* ``tls_client_auth_san_ip``: an iPAddress entry, compared in binary (RFC 5952 §8): ``::1`` matches
  ``0:0:0:0:0:0:0:1``;
* ``tls_client_auth_san_email``: an rfc822Name entry: the local part exactly, the domain
  case-insensitively.

``self_signed_tls_client_auth`` (§2.2): no chain validation; the certificate's public key is one of
the keys of the client's registered ``jwks`` or ``jwks_uri``.
"""

from __future__ import annotations

import ipaddress
import re
import time
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from trustplane.jose.jwk import PublicKey

#: RFC 8705 §2.1.2: a ``tls_client_auth`` client registers exactly one of these.
SUBJECT_FIELDS = (
    "tls_client_auth_subject_dn",
    "tls_client_auth_san_dns",
    "tls_client_auth_san_uri",
    "tls_client_auth_san_ip",
    "tls_client_auth_san_email",
)
_SPACES = re.compile(r"\s+")
VERIFIED_TTL = 60.0
VERIFIED_CACHE_SIZE = 10_000


class CertificateError(ValueError):
    """The certificate does not authenticate the client; the message says why (log only),
    ``reason`` in a word (``chain``, ``subject``, ``key``) for metrics."""

    def __init__(self, message: str, reason: str = "chain") -> None:
        super().__init__(message)
        self.reason = reason


class CertificateAuthorities:
    """The CAs of ``tls_client_ca``; :meth:`verify` validates a client certificate's chain.

    A chain that validated is remembered for ``VERIFIED_TTL`` seconds (never past the certificate's
    ``notAfter``), keyed by the certificate's SHA-256: path validation costs ~180 µs, and a client
    presents the same certificate on every request. Failures are not remembered."""

    def __init__(self, certificates: list[x509.Certificate]) -> None:
        if not certificates:
            raise ValueError("the CA bundle holds no certificate")
        self._store = Store(certificates)
        self._verified: dict[bytes, float] = {}
        # RFC 8705 identifies a client by subject DN as well as by SAN: the Web PKI's rule that an
        # end-entity certificate carries a SAN does not apply to client certificates here.
        self._ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )

    @classmethod
    def from_file(cls, path: Path) -> CertificateAuthorities:
        return cls(x509.load_pem_x509_certificates(path.read_bytes()))

    def verify(self, cert: x509.Certificate, intermediates: list[x509.Certificate] = []) -> None:  # noqa: B006
        """Raise :class:`CertificateError` unless ``cert`` chains to one of the CAs now and is
        meant for client authentication (its extended key usage allows it)."""
        now = time.time()
        key = cert.fingerprint(hashes.SHA256())
        until = self._verified.get(key)
        if until is not None and now < until:
            return
        self._verify(cert, intermediates)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        not_after = cert.not_valid_after_utc.timestamp()
        self._verified[key] = min(now + VERIFIED_TTL, not_after)

    def _verify(self, cert: x509.Certificate, intermediates: list[x509.Certificate]) -> None:
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(datetime.now(UTC))
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=self._ee_policy
            )
            .build_client_verifier()
        )
        try:
            verifier.verify(cert, intermediates)
        except VerificationError as exc:
            raise CertificateError(f"the certificate chain is not valid: {exc}") from None


def subject_matches(cert: x509.Certificate, field: str, expected: str) -> bool:
    """RFC 8705 §2.1.2: is the registered ``field`` value ``expected`` in ``cert``?"""
    try:
        return _matches(cert, field, expected)
    except ValueError:  # a stored value that no longer parses matches nothing
        return False


def _matches(cert: x509.Certificate, field: str, expected: str) -> bool:
    if field == "tls_client_auth_subject_dn":
        return _dn_key(cert.subject) == _expected_dn_key(expected)
    sans = _sans(cert)
    if field == "tls_client_auth_san_dns":
        return expected.lower() in {v.lower() for v in sans.get_values_for_type(x509.DNSName)}
    if field == "tls_client_auth_san_uri":
        return expected in sans.get_values_for_type(x509.UniformResourceIdentifier)
    if field == "tls_client_auth_san_ip":
        return ipaddress.ip_address(expected) in sans.get_values_for_type(x509.IPAddress)
    if field == "tls_client_auth_san_email":
        return _email_key(expected) in {
            _email_key(v) for v in sans.get_values_for_type(x509.RFC822Name)
        }
    return False


def public_key_matches(cert: x509.Certificate, keys: list[PublicKey]) -> bool:
    """RFC 8705 §2.2: the certificate's key is one of the client's registered keys."""
    spki = _spki(cert.public_key())
    return spki is not None and any(_spki(key) == spki for key in keys)


def parse_dn(text: str) -> x509.Name:
    """An RFC 4514 string as a name; ``ValueError`` when it is not one.

    Attribute type names are case-insensitive (RFC 4512 §1.4 ``descr``) and, as RFC 4514 §4 allows a
    parser, spaces around the ``,`` and ``+`` separators are ignored (RFC 2253 wrote them)."""
    parts = [_normal_type(p) for p in _split_unescaped(text.strip())]
    try:
        name = x509.Name.from_rfc4514_string("".join(parts))
    except ValueError as exc:
        raise ValueError(f"not an RFC 4514 distinguished name: {exc}") from None
    if not name.rdns:
        raise ValueError("an empty distinguished name")
    return name


def _split_unescaped(text: str) -> list[str]:
    """``text`` cut after each unescaped ``,`` or ``+`` (separators kept at the end of a part)."""
    parts, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] in ",+":
            parts.append(text[start : i + 1])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _normal_type(part: str) -> str:
    """One ``type=value[sep]``: spaces around it dropped (not an escaped trailing space), the
    type name upper-cased (``cn`` is ``CN``; dotted OIDs are unchanged)."""
    sep = part[-1] if part and part[-1] in ",+" and not part.endswith("\\" + part[-1]) else ""
    body = part[:-1] if sep else part
    body = body.lstrip()
    if body.endswith(" ") and not body.endswith("\\ "):
        body = body.rstrip(" ")
    kind, eq, value = body.partition("=")
    return kind.strip().upper() + eq + value.lstrip(" ") + sep


def _dn_key(name: x509.Name) -> tuple[frozenset[tuple[str, str]], ...]:
    return tuple(frozenset((a.oid.dotted_string, _fold(a.value)) for a in rdn) for rdn in name.rdns)


@lru_cache(maxsize=4096)
def _expected_dn_key(text: str) -> tuple[frozenset[tuple[str, str]], ...]:
    """A registered DN, parsed once (registered values are few and rarely change)."""
    return _dn_key(parse_dn(text))


def _fold(value: str | bytes) -> str:
    text = value if isinstance(value, str) else value.hex()
    return _SPACES.sub(" ", text).strip().casefold()


def _email_key(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain.lower()


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return x509.SubjectAlternativeName([])


def _spki(key: object) -> bytes | None:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        return None
    try:
        data: bytes = public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (TypeError, ValueError):
        return None
    return data
