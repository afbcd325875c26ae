"""A throw-away PKI for the mutual-TLS tests: a CA, a server certificate for 127.0.0.1, client
certificates, a second CA nobody trusts, and a self-signed client certificate; written to a
directory so servers, nginx and curl can load them. Built with :mod:`trustplane.tls.dev_ca`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.serialization import Encoding

from trustplane.jose.jwk import PrivateKey
from trustplane.tls.dev_ca import Issued, Subject, create_ca, issue, self_signed

CLIENT_DN = "CN=desk-7,O=Acme Trading"
CLIENT_DNS = "desk-7.acme.example"
CLIENT_URI = "spiffe://acme.example/desk-7"
CLIENT_IP = "2001:db8::7"
CLIENT_EMAIL = "Desk-7@Acme.Example"


@dataclass
class Pki:
    directory: Path
    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    stranger: Issued  # issued by other_ca, same subject as client
    self_signed: Issued

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca_file(self) -> Path:
        return self.path("ca.crt")

    def pair(self, stem: str) -> tuple[str, str]:
        """(certificate file, key file) for httpx ``cert=`` / curl ``--cert --key``."""
        return str(self.path(f"{stem}.crt")), str(self.path(f"{stem}.key"))


def client_subject(common_name: str = "desk-7") -> Subject:
    return Subject(
        common_name,
        organization="Acme Trading",
        dns=(CLIENT_DNS,),
        uris=(CLIENT_URI,),
        ips=(CLIENT_IP,),
        emails=(CLIENT_EMAIL,),
    )


def build_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = create_ca("trustplane test CA")
    other = create_ca("somebody else's CA")
    pki = Pki(
        directory,
        ca,
        issue(ca, Subject("127.0.0.1", ips=("127.0.0.1",), dns=("localhost",)), server=True),
        issue(ca, client_subject()),
        other,
        issue(other, client_subject()),
        self_signed(Subject("self-signed desk")),
    )
    (directory / "ca.crt").write_bytes(ca.cert_pem())
    (directory / "other-ca.crt").write_bytes(other.cert_pem())
    for stem in ("server", "client", "stranger", "self_signed"):
        getattr(pki, stem).write(directory, stem)
    return pki


def escaped_pem(issued: Issued) -> str:
    """What nginx's ``$ssl_client_escaped_cert`` sends: the URL-encoded PEM."""
    return quote(issued.certificate.public_bytes(Encoding.PEM).decode("ascii"), safe="")


def public_jwks(key: PrivateKey, kid: str = "tls") -> dict[str, object]:
    from joserfc.jwk import ECKey

    jwk = ECKey.import_key(key.public_key()).as_dict(private=False)  # type: ignore[arg-type]
    return {"keys": [{**jwk, "kid": kid, "use": "sig"}]}
