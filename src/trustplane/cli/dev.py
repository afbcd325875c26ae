"""``trustplane dev ca ...``: a private CA and certificates for trying mutual TLS on one machine.

    trustplane dev ca create --out certs                       # certs/ca.crt, certs/ca.key
    trustplane dev ca issue --out certs --name localhost --server --dns localhost --ip 127.0.0.1
    trustplane dev ca issue --out certs --name desk-7 --organization "Acme Trading"

Development only: the CA key sits in a file next to the certificates (mode 0600). Nothing here
touches the deployment's database or settings. See README "Trying mutual TLS".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli.common import JsonFlag, _emit_json, fail, out

dev_app = typer.Typer(help="Developer helpers (not for production).", no_args_is_help=True)
ca_app = typer.Typer(help="A private CA for trying mutual TLS.", no_args_is_help=True)
dev_app.add_typer(ca_app, name="ca")

OutDir = Annotated[Path, typer.Option("--out", help="Directory of the CA and certificates.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing files.")]


def _free(paths: list[Path], force: bool) -> None:
    taken = [str(p) for p in paths if p.exists()]
    if taken and not force:
        fail(f"{', '.join(taken)} already exist(s); use --force to overwrite")


@ca_app.command("create")
def ca_create(
    out_dir: OutDir,
    name: Annotated[str, typer.Option(help="The CA's common name.")] = "trustplane dev CA",
    force: Force = False,
    as_json: JsonFlag = False,
) -> None:
    """Create a CA: OUT/ca.crt (give it to servers as tls_client_ca, to clients as --cacert) and
    OUT/ca.key."""
    from trustplane.tls.dev_ca import create_ca

    out_dir.mkdir(parents=True, exist_ok=True)
    _free([out_dir / "ca.crt", out_dir / "ca.key"], force)
    cert_path, key_path = create_ca(name).write(out_dir, "ca")
    if as_json:
        _emit_json({"certificate": str(cert_path), "key": str(key_path)})
        return
    out.print(f"CA certificate  {cert_path}", highlight=False)
    out.print(f"CA key          {key_path}   (keep it private)", highlight=False)


@ca_app.command("issue")
def ca_issue(
    out_dir: OutDir,
    name: Annotated[str, typer.Option(help="Common name; the files are OUT/NAME.crt, .key.")],
    organization: Annotated[
        str | None, typer.Option(help="Organization (O) of the subject.")
    ] = None,
    dns: Annotated[list[str] | None, typer.Option(help="dNSName SAN (repeatable).")] = None,
    uri: Annotated[list[str] | None, typer.Option(help="URI SAN (repeatable).")] = None,
    ip: Annotated[list[str] | None, typer.Option(help="iPAddress SAN (repeatable).")] = None,
    email: Annotated[list[str] | None, typer.Option(help="rfc822Name SAN (repeatable).")] = None,
    server: Annotated[
        bool, typer.Option("--server", help="A TLS server certificate (RSA key, serverAuth).")
    ] = False,
    self_signed: Annotated[
        bool,
        typer.Option(
            "--self-signed", help="Self-signed client certificate (self_signed_tls_client_auth)."
        ),
    ] = False,
    force: Force = False,
    as_json: JsonFlag = False,
) -> None:
    """Issue a client (default) or server certificate signed by OUT/ca.key, or a self-signed one."""
    import ipaddress

    from trustplane.tls import certificate_thumbprint
    from trustplane.tls.dev_ca import Subject, issue, load
    from trustplane.tls.dev_ca import self_signed as make_self_signed

    if server and self_signed:
        fail("--server and --self-signed exclude each other")
    stem = name.replace("/", "_")
    _free([out_dir / f"{stem}.crt", out_dir / f"{stem}.key"], force)
    for address in ip or []:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            fail(f"--ip {address!r} is not an IP address")
    subject = Subject(name, organization, tuple(dns or ()), tuple(uri or ()), tuple(ip or ()),
                      tuple(email or ()))  # fmt: skip
    if self_signed:
        issued = make_self_signed(subject)
    else:
        ca_cert, ca_key = out_dir / "ca.crt", out_dir / "ca.key"
        if not ca_cert.exists() or not ca_key.exists():
            fail(f"no CA in {out_dir}: run `trustplane dev ca create --out {out_dir}` first")
        issued = issue(load(ca_cert, ca_key), subject, server=server)
    cert_path, key_path = issued.write(out_dir, stem)
    body = {
        "certificate": str(cert_path),
        "key": str(key_path),
        "subject_dn": issued.certificate.subject.rfc4514_string(),
        "x5t#S256": certificate_thumbprint(issued.certificate),
    }
    if as_json:
        _emit_json(body)
        return
    for label, value in body.items():
        out.print(f"{label:<12} {value}", highlight=False)
