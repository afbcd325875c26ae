"""``trustplane keys ...``: token-signing keys."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from trustplane.cli.common import JsonFlag, _emit_json, _run, _settings, _when, _with_services, out

keys_app = typer.Typer(help="Token-signing keys.", no_args_is_help=True)


@keys_app.command("list")
def keys_list(as_json: JsonFlag = False) -> None:
    """List signing keys and their lifecycle state."""
    settings = _settings()
    keys = _run(_with_services(settings, lambda svc: svc.keys.list_all()))
    rows: list[dict[str, Any]] = [
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
