"""``trustplane clients ...`` and ``trustplane registration-token ...``: registered clients."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.table import Table

from trustplane.cli.common import JsonFlag, _emit_json, _run, _settings, _with_services, err, out
from trustplane.clients.model import hash_secret
from trustplane.clients.store import token_id

if TYPE_CHECKING:
    from trustplane.clients.model import Client
    from trustplane.clients.service import Registration
    from trustplane.services import Services

clients_app = typer.Typer(help="Registered clients.", no_args_is_help=True)
regtoken_app = typer.Typer(
    help="Initial access tokens for dynamic registration.", no_args_is_help=True
)


#: Printed (stderr) when the operator asks for an unbound token.
ANY_LEI_WARNING = (
    "trustplane: warning: --any-lei: whoever holds this token can register a client of ANY legal "
    "entity and act for it; prefer --lei"
)


@regtoken_app.command("create")
def registration_token_create(
    description: Annotated[str, typer.Option(help="Who or what the token is for.")] = "cli",
    ttl: Annotated[int | None, typer.Option(help="Lifetime in seconds.")] = None,
    uses: Annotated[
        int | None, typer.Option(help="Maximum registrations (default: unlimited).")
    ] = None,
    lei: Annotated[
        str | None,
        typer.Option(help="Register clients of this legal entity (LEI) only."),
    ] = None,
    any_lei: Annotated[
        bool,
        typer.Option(
            "--any-lei",
            help="Instead of --lei: register clients of any legal entity (its holder can act for "
            "any of them).",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create an initial access token for POST /register (RFC 7591 §3), bound to one legal entity
    (--lei) or, explicitly, to none (--any-lei). Shown once."""
    settings = _settings()
    try:
        token = _run(
            _with_services(
                settings,
                lambda svc: svc.clients.create_initial_access_token(
                    description, ttl, uses, lei=lei, any_lei=any_lei
                ),
            )
        )
    except ValueError as exc:
        err.print(f"[red]trustplane:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if any_lei:
        err.print(ANY_LEI_WARNING, highlight=False, markup=False)
    if as_json:
        bound: dict[str, object] = {"lei": lei} if lei else {"any_lei": True}
        endpoint = f"{settings.issuer}/register"
        _emit_json(
            {
                "initial_access_token": token,
                "id": token_id(hash_secret(token)),
                "registration_endpoint": endpoint,
                **bound,
            }
        )
    else:
        out.print(token, highlight=False)


def _when(epoch: int | None) -> str:
    return "" if epoch is None else time.strftime("%Y-%m-%d", time.gmtime(epoch))


@regtoken_app.command("list")
def registration_token_list(
    all_: Annotated[
        bool, typer.Option("--all", help="Also the revoked, expired and used-up tokens.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """List the initial access tokens, newest first: id (for revoke), state, legal entity, uses,
    expiry. The tokens themselves are not stored and cannot be shown."""
    tokens = _run(_with_services(_settings(), lambda svc: svc.clients.initial_access_tokens()))
    now = int(time.time())
    shown = [t for t in tokens if all_ or t.state(now) == "active"]
    if as_json:
        _emit_json(
            [
                {
                    "id": t.id,
                    "state": t.state(now),
                    "description": t.description,
                    "lei": t.lei,
                    "any_lei": t.any_lei,
                    "uses": t.uses,
                    "max_uses": t.max_uses,
                    "created_at": t.created_at,
                    "expires_at": t.expires_at,
                    "revoked_at": t.revoked_at,
                }
                for t in shown
            ]
        )
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)  # fits 80 columns
    for column in ("id", "state", "lei", "uses", "expires"):
        table.add_column(column, no_wrap=True)  # an id to copy, whole
    table.add_column("description", min_width=12)
    for t in shown:
        uses = f"{t.uses}/{t.max_uses}" if t.max_uses is not None else str(t.uses)
        table.add_row(
            t.id,
            t.state(now),
            t.lei or ("any" if t.any_lei else ""),
            uses,
            _when(t.expires_at),
            t.description,
        )
    out.print(table)


@regtoken_app.command("revoke")
def registration_token_revoke(
    token: Annotated[
        str, typer.Argument(metavar="ID", help="The id `registration-token list` shows.")
    ],
) -> None:
    """Revoke an initial access token: it registers nothing from now on (the clients it registered
    stay: `clients disable` them apart). Audited (`oauth:registration_token:revoked`)."""
    try:
        revoked = _run(
            _with_services(_settings(), lambda svc: svc.clients.revoke_initial_access_token(token))
        )
    except ValueError as exc:
        err.print(f"trustplane: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    except LookupError as exc:
        err.print(f"trustplane: {exc.args[0]}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    out.print(f"revoked {revoked.id} ({revoked.description}, {revoked.uses} uses)", highlight=False)


@clients_app.command("add")
def clients_add(
    lei: Annotated[str, typer.Option(help="ISO 17442 LEI of the owning legal entity.")],
    scope: Annotated[list[str], typer.Option(help="Allowed scope (repeatable).")],
    resource: Annotated[list[str], typer.Option(help="Allowed resource / audience (repeatable).")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    auth_method: Annotated[
        str, typer.Option(help="token_endpoint_auth_method.")
    ] = "private_key_jwt",
    jwks_file: Annotated[
        Path | None, typer.Option(help="File with the client's public JWK Set.")
    ] = None,
    jwks_uri: Annotated[str | None, typer.Option(help="URL of the client's JWK Set.")] = None,
    grant_type: Annotated[list[str] | None, typer.Option(help="Grant type (repeatable).")] = None,
    resource_server: Annotated[
        list[str] | None,
        typer.Option(
            "--resource-server",
            "--introspection-resource",
            help="Audience this client is the resource server for: it may introspect and exchange "
            "other clients' tokens addressed there (repeatable; operator-only).",
        ),
    ] = None,
    redirect_uri: Annotated[
        list[str] | None, typer.Option(help="Redirect URI (repeatable).")
    ] = None,
    authorization_details_type: Annotated[
        list[str] | None,
        typer.Option(
            help="RFC 9396 authorization_details type the client may request (repeatable)."
        ),
    ] = None,
    tls_subject: Annotated[
        list[str] | None,
        typer.Option(
            "--tls-subject",
            help="tls_client_auth: the one expected certificate subject (RFC 8705 §2.1.2), as "
            "dn=RFC4514-DN, dns=NAME, uri=URI, ip=ADDRESS or email=ADDRESS.",
        ),
    ] = None,
    certificate_bound: Annotated[
        bool,
        typer.Option(
            "--certificate-bound-tokens",
            help="tls_client_certificate_bound_access_tokens (RFC 8705 §3.4).",
        ),
    ] = False,
    dpop_bound: Annotated[
        bool,
        typer.Option(
            "--dpop-bound",
            help="dpop_bound_access_tokens (RFC 9449 §5.2): refuse the client's token requests "
            "without a DPoP proof.",
        ),
    ] = False,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            help="fapi2: hold the client to the FAPI 2.0 profile on a default deployment "
            "(docs/fapi2.md); a client can be made stricter, never looser.",
        ),
    ] = None,
    require_par: Annotated[
        bool,
        typer.Option(
            "--require-par",
            help="The client must push its authorization requests to /par (RFC 9126 "
            "require_pushed_authorization_requests).",
        ),
    ] = False,
    require_signed_request_object: Annotated[
        bool,
        typer.Option(
            "--require-signed-request-object",
            help="The client must send its authorization requests as signed request objects "
            "(RFC 9101 require_signed_request_object; needs its keys).",
        ),
    ] = False,
    request_object_signing_alg: Annotated[
        str | None,
        typer.Option(help="The one algorithm the client's request objects may use (ES256, ...)."),
    ] = None,
    txn_token_requester: Annotated[
        bool,
        typer.Option(
            "--txn-token-requester",
            help="The client may request Transaction Tokens (draft-ietf-oauth-transaction-tokens) "
            "for the access tokens it receives (operator-only).",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Register a client directly (no initial access token needed: you hold the database)."""
    settings = _settings()
    raw: dict[str, Any] = {
        "lei": lei,
        "scope": " ".join(scope),
        "allowed_resources": resource,
        "token_endpoint_auth_method": auth_method,
        "grant_types": grant_type or ["client_credentials"],
        "resource_server_for": resource_server or [],
        **({"txn_token_requester": True} if txn_token_requester else {}),
        "redirect_uris": redirect_uri or [],
        "authorization_details_types": authorization_details_type or [],
    }
    if name:
        raw["client_name"] = name
    if jwks_file:
        raw["jwks"] = json.loads(jwks_file.read_text())
    if jwks_uri:
        raw["jwks_uri"] = jwks_uri
    raw.update(_tls_subjects(tls_subject or []))
    if certificate_bound:
        raw["tls_client_certificate_bound_access_tokens"] = True
    if dpop_bound:
        raw["dpop_bound_access_tokens"] = True
    if profile is not None:
        raw["profile"] = profile
    if require_par:
        raw["require_pushed_authorization_requests"] = True
    if require_signed_request_object:
        raw["require_signed_request_object"] = True
    if request_object_signing_alg:
        raw["request_object_signing_alg"] = request_object_signing_alg
    from trustplane.errors import OAuth2Error

    async def register(svc: Services) -> Registration:
        return await svc.clients.register(
            raw, initial_access_token=None, issue_registration_token=False
        )

    try:
        reg = _run(_with_services(settings, register))
    except OAuth2Error as exc:
        err.print(f"[red]trustplane:[/red] {exc.error}: {exc.description}", highlight=False)
        raise typer.Exit(1) from None
    body = reg.client.public_metadata()
    if reg.client_secret:
        body["client_secret"] = reg.client_secret
    if as_json:
        _emit_json(body)
        return
    out.print(f"client_id     {reg.client.client_id}")
    if reg.client_secret:
        out.print(f"client_secret {reg.client_secret}   (shown once; only its hash is stored)")


#: ``--tls-subject KIND=VALUE`` -> the RFC 8705 §2.1.2 metadata member.
TLS_SUBJECT_KINDS = {
    "dn": "tls_client_auth_subject_dn",
    "dns": "tls_client_auth_san_dns",
    "uri": "tls_client_auth_san_uri",
    "ip": "tls_client_auth_san_ip",
    "email": "tls_client_auth_san_email",
}


def _tls_subjects(values: list[str]) -> dict[str, str]:
    """Each ``KIND=VALUE`` as its metadata member; registration refuses more than one."""
    out: dict[str, str] = {}
    for value in values:
        kind, sep, subject = value.partition("=")
        if not sep or kind not in TLS_SUBJECT_KINDS or TLS_SUBJECT_KINDS[kind] in out:
            err.print(
                f"[red]trustplane:[/red] --tls-subject {value!r}: use KIND=VALUE with KIND one of "
                f"{', '.join(TLS_SUBJECT_KINDS)}, each kind once",
                highlight=False,
            )
            raise typer.Exit(2)
        out[TLS_SUBJECT_KINDS[kind]] = subject
    return out


@clients_app.command("list")
def clients_list(as_json: JsonFlag = False) -> None:
    """List clients."""
    settings = _settings()
    clients = _run(_with_services(settings, lambda svc: svc.clients.list()))
    if as_json:
        _emit_json([{**c.public_metadata(), "status": c.status.value} for c in clients])
        return
    table = Table("client_id", "name", "lei", "auth", "status", "scopes")
    for c in clients:
        table.add_row(
            c.client_id,
            c.metadata.get("client_name", ""),
            c.lei,
            c.auth_method,
            c.status.value,
            " ".join(sorted(c.scopes)),
        )
    out.print(table)


@clients_app.command("show")
def clients_show(client_id: str, as_json: JsonFlag = False) -> None:
    """Show one client's metadata."""
    client = _lookup(client_id)
    body = {**client.public_metadata(), "status": client.status.value}
    if as_json:
        _emit_json(body)
    else:
        for key, value in body.items():
            out.print(f"{key:<26} {value}", highlight=False)


@clients_app.command("disable")
def clients_disable(client_id: str) -> None:
    """Disable a client: it can no longer authenticate and its tokens stop introspecting as active."""
    _set_status(client_id, "disabled")


@clients_app.command("enable")
def clients_enable(client_id: str) -> None:
    """Re-enable a disabled client."""
    _set_status(client_id, "active")


@clients_app.command("keygen")
def clients_keygen(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory for key.pem and jwks.json.")
    ] = Path("."),
    kid: Annotated[str, typer.Option(help="kid of the key.")] = "client-key-1",
) -> None:
    """Generate an ES256 key pair for private_key_jwt: key.pem (keep it) and jwks.json (register it)."""
    from cryptography.hazmat.primitives import serialization

    from trustplane.keys.crypto import generate_private_key, public_jwk

    key = generate_private_key("ES256")
    out_dir.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(out_dir / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    jwks = {"keys": [{**public_jwk(key), "kid": kid, "alg": "ES256", "use": "sig"}]}
    (out_dir / "jwks.json").write_text(json.dumps(jwks, indent=2) + "\n")
    out.print(f"wrote {out_dir / 'key.pem'} (private, 0600) and {out_dir / 'jwks.json'} (public)")


@clients_app.command("assertion")
def clients_assertion(
    client_id: Annotated[str, typer.Option(help="The client's id (iss and sub).")],
    key: Annotated[Path, typer.Option(help="The client's private key (PEM).")],
    kid: Annotated[str | None, typer.Option(help="kid header.")] = "client-key-1",
    lifetime: Annotated[int, typer.Option(help="Seconds until exp (at most 300).")] = 60,
) -> None:
    """Print a fresh private_key_jwt client assertion (for curl and tests; never reuse one)."""
    from cryptography.hazmat.primitives import serialization

    from trustplane.ids import new_jti
    from trustplane.jose.jws import Signer

    settings = _settings()
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    signer = Signer(private, "ES256", kid or "", typ="JWT")  # type: ignore[arg-type]
    now = int(time.time())
    print(
        signer.sign(
            {
                "iss": client_id,
                "sub": client_id,
                "aud": settings.issuer,
                "iat": now,
                "exp": now + lifetime,
                "jti": new_jti(),
            }
        )
    )


def _lookup(client_id: str) -> Client:
    from trustplane.clients.service import ClientNotFoundError

    settings = _settings()
    try:
        return _run(_with_services(settings, lambda svc: svc.clients.get(client_id)))
    except ClientNotFoundError:
        err.print(f"[red]trustplane:[/red] no client {client_id!r}")
        raise typer.Exit(1) from None


def _set_status(client_id: str, status: str) -> None:
    from trustplane.clients.model import ClientStatus
    from trustplane.clients.service import ClientNotFoundError

    settings = _settings()
    try:
        _run(
            _with_services(
                settings, lambda svc: svc.clients.set_status(client_id, ClientStatus(status))
            )
        )
    except ClientNotFoundError:
        err.print(f"[red]trustplane:[/red] no client {client_id!r}")
        raise typer.Exit(1) from None
    out.print(f"client {client_id} is now {status}")
