"""The ``trustplane`` command line. Every command reads the same settings as the server; a wrong
setting ends the command with one line on stderr and exit code 2."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trustplane import __version__
from trustplane.audit.cli import audit_app
from trustplane.federation.cli import partners_app
from trustplane.policy.cli import policy_app
from trustplane.settings import Settings, SettingsError, load_settings

T = TypeVar("T")
app = typer.Typer(
    help="trustplane: the identity control plane for institutional trade workflows.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Token-signing keys.", no_args_is_help=True)
clients_app = typer.Typer(help="Registered clients.", no_args_is_help=True)
regtoken_app = typer.Typer(
    help="Initial access tokens for dynamic registration.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
app.add_typer(clients_app, name="clients")
app.add_typer(regtoken_app, name="registration-token")
app.add_typer(partners_app, name="partners")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")
out = Console(soft_wrap=True)  # banner lines stay whole in logs and narrow terminals
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the terminal width
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        err.print(f"[red]trustplane:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except SettingsError as exc:
        err.print(f"[red]trustplane:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


async def _with_services(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    from trustplane.app import Services
    from trustplane.storage.migrate import pending

    svc = Services.build(settings)
    try:
        if await pending(svc.db):
            err.print(
                "[red]trustplane:[/red] database schema is not up to date: run `trustplane migrate`"
            )
            raise typer.Exit(2)
        return await fn(svc)
    finally:
        await svc.db.dispose()


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic) and create the signing keys if there are none."""
    settings = _settings()
    created = _run(_prepare(settings))
    out.print(f"database at head: {settings.effective_database_url.split('@')[-1]}")
    if created:
        out.print("created the active and next signing keys")


async def _prepare(settings: Settings) -> bool:
    from trustplane.app import Services
    from trustplane.storage.migrate import upgrade

    svc = Services.build(settings)
    try:
        await upgrade(svc.db)
        return await svc.keys.ensure()
    finally:
        await svc.db.dispose()


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (TRUSTPLANE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (TRUSTPLANE_PORT).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (TRUSTPLANE_WORKERS).")
    ] = None,
) -> None:
    """Run the server. First start: migrates the database and generates the signing keys."""
    from trustplane import server

    overrides = {"host": host, "port": port, "workers": workers}
    settings = _settings(**overrides)
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"TRUSTPLANE_{name.upper()}"] = str(value)
    try:
        sockets = server.bind(settings)  # a taken port: one line naming the setting, exit 2
    except SettingsError as exc:
        err.print(f"[red]trustplane:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    created = _run(_prepare(settings))
    out.print(f"[bold]trustplane {__version__}[/bold]")
    out.print(f"issuer        {settings.issuer}")
    out.print(f"JWKS          {settings.issuer}/jwks")
    out.print(f"metadata      {settings.issuer}/.well-known/oauth-authorization-server")
    out.print(f"database      {settings.effective_database_url.split('@')[-1]}")
    if settings.ops_port:
        out.print(
            f"operations    http://{settings.ops_host}:{settings.ops_port}/metrics /readyz /docs"
        )
    if created:
        out.print("signing keys  generated (active + next)")
    out.print("register      `trustplane registration-token create` prints an initial access token")
    out.print(f"              for POST {settings.issuer}/register")
    server.run(settings, sockets)


@keys_app.command("list")
def keys_list(as_json: JsonFlag = False) -> None:
    """List signing keys and their lifecycle state."""
    settings = _settings()
    keys = _run(_with_services(settings, lambda svc: svc.keys.list_all()))
    rows = [
        {
            "kid": k.kid,
            "alg": k.alg,
            "state": k.state.value,
            "created_at": k.created_at,
            "activated_at": k.activated_at,
            "retired_at": k.retired_at,
            "remove_after": k.remove_after,
        }
        for k in keys
    ]
    if as_json:
        _emit_json(rows)
        return
    table = Table("kid", "alg", "state", "created", "activated", "remove after")
    for r in rows:
        table.add_row(
            r["kid"],
            r["alg"],
            r["state"],
            _when(r["created_at"]),
            _when(r["activated_at"]),
            _when(r["remove_after"]),
        )
    out.print(table)


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Rotate now: next -> active, active -> retired (published until its tokens expire), new next."""
    settings = _settings()
    kid = _run(_with_services(settings, lambda svc: svc.keys.rotate(reason="cli")))
    out.print(
        f"active signing key is now {kid}; running servers pick it up within "
        f"{settings.cache_refresh_interval:g} s"
    )


@keys_app.command("prune")
def keys_prune(as_json: JsonFlag = False) -> None:
    """Remove retired keys whose tokens have all expired (running servers also do this every minute)."""
    settings = _settings()
    removed = _run(_with_services(settings, lambda svc: svc.keys.prune()))
    if as_json:
        _emit_json({"removed": removed})
    elif removed:
        out.print(f"removed {', '.join(removed)}; running servers drop them from the JWKS")
    else:
        out.print("no retired key is due for removal")


@keys_app.command("new-kek")
def keys_new_kek() -> None:
    """Print a fresh key-encryption key for TRUSTPLANE_KEY_ENCRYPTION_KEY (store it in your secret manager)."""
    from trustplane.keys.crypto import new_kek_text

    print(new_kek_text())


@regtoken_app.command("create")
def registration_token_create(
    description: Annotated[str, typer.Option(help="Who or what the token is for.")] = "cli",
    ttl: Annotated[int | None, typer.Option(help="Lifetime in seconds.")] = None,
    uses: Annotated[
        int | None, typer.Option(help="Maximum registrations (default: unlimited).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an initial access token for POST /register (RFC 7591 §3). Shown once."""
    settings = _settings()
    token = _run(
        _with_services(
            settings, lambda svc: svc.clients.create_initial_access_token(description, ttl, uses)
        )
    )
    if as_json:
        _emit_json(
            {"initial_access_token": token, "registration_endpoint": f"{settings.issuer}/register"}
        )
    else:
        out.print(token, highlight=False)


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
    introspection_resource: Annotated[
        list[str] | None, typer.Option(help="Resource whose tokens this client may introspect.")
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
        "introspection_resources": introspection_resource or [],
        "redirect_uris": redirect_uri or [],
        "authorization_details_types": authorization_details_type or [],
    }
    if name:
        raw["client_name"] = name
    if jwks_file:
        raw["jwks"] = json.loads(jwks_file.read_text())
    if jwks_uri:
        raw["jwks_uri"] = jwks_uri
    from trustplane.errors import OAuth2Error

    async def register(svc: Any) -> Any:
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

    from trustplane.jose.jws import Signer
    from trustplane.oauth.tokens import new_jti

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


def _lookup(client_id: str) -> Any:
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


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def main() -> None:
    app()


# component command groups live in their own modules (they import the helpers above)
from trustplane.users.cli import users_app  # noqa: E402

app.add_typer(users_app, name="users")
from trustplane.mandates.cli import mandates_app  # noqa: E402

app.add_typer(mandates_app, name="mandates")
