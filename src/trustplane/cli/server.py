"""``trustplane version``, ``migrate`` and ``serve``: the deployment itself."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from trustplane import __version__
from trustplane.cli.common import (
    _run,
    _settings,
    build_services,
    global_options,
    open_database,
    out,
    vocabulary,
)
from trustplane.settings import Settings
from trustplane.startup import quiet_gc


def version() -> None:
    """Print the version."""
    out.print(__version__)


def migrate() -> None:
    """Bring the database schema up to date (Alembic) and create the signing keys if there are none."""
    settings = _settings()
    created = _run(_prepare(settings))
    out.print(f"database at head: {settings.effective_database_url.split('@')[-1]}")
    if created:
        out.print("created the active and next signing keys")


async def _prepare(settings: Settings) -> bool:
    """Create or upgrade the deployment: the only path that may create its directory and files."""
    from trustplane.storage.migrate import upgrade

    vocabulary(settings)  # a refused scope file stops before the data directory is made
    db = await open_database(settings, create=True)
    try:
        svc = build_services(settings, db)  # a wrong scopes or types file stops before the schema
        await upgrade(db)
        return await svc.keys.ensure()
    finally:
        await db.dispose()


def _default(name: str) -> str:
    """What ``--help`` shows: the built-in default, and the variable that changes it."""
    return f"TRUSTPLANE_{name.upper()}, else {Settings.model_fields[name].default}"


def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Bind address.", show_default=_default("host")),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port.", show_default=_default("port"))] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Worker processes.", show_default=_default("workers")),
    ] = None,
) -> None:
    """Run the server. First start: migrates the database and generates the signing keys."""
    with quiet_gc():
        from trustplane import server

    overrides = {"host": host, "port": port, "workers": workers}
    settings = _settings(**overrides)
    for name, value in {**global_options, **overrides}.items():
        if value is not None:
            os.environ[f"TRUSTPLANE_{name.upper()}"] = str(value)
    # bound before anything is printed or migrated: a taken port is one line naming its setting
    sockets = server.bind(settings)
    created = _run(_prepare(settings))
    out.print(f"[bold]trustplane {__version__}[/bold]")
    out.print(f"issuer        {settings.issuer}")
    out.print(f"JWKS          {settings.issuer}/jwks")
    out.print(f"metadata      {settings.issuer}/.well-known/oauth-authorization-server")
    out.print(f"database      {settings.effective_database_url.split('@')[-1]}")
    if settings.ops_port:
        scheme = "https" if settings.tls_enabled else "http"  # TLS covers both listeners
        out.print(
            f"operations    {scheme}://{settings.ops_host}:{settings.ops_port}/metrics /readyz /docs"
        )
    if settings.tls_enabled or settings.proxy_mode:
        out.print(f"client certs  {_client_certificates(settings)}")
    if created:
        out.print("signing keys  generated (active + next)")
    out.print("register      `trustplane registration-token create --lei LEI` prints a token")
    out.print(f"              for POST {settings.issuer}/register (clients of that LEI only)")
    server.run(settings, sockets)


def _client_certificates(settings: Settings) -> str:
    """Where RFC 8705 client certificates come from, for the banner."""
    if settings.proxy_mode:
        proxies = ", ".join(settings.trusted_proxies)
        return f"header {settings.tls_client_cert_header} from trusted proxies {proxies}"
    if settings.tls_client_ca is not None:
        return f"TLS handshake (optional), verified against {settings.tls_client_ca}"
    return "not requested (no tls_client_ca)"
