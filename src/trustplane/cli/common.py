"""What every ``trustplane`` command shares: settings, the event loop, the services, output.

Every command reads the same settings as the server; a wrong setting ends the command with one line on
stderr and exit code 2. Command modules import this module only (never the package), so the package
can import every command module without a circle.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from trustplane.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from trustplane.app import Services

T = TypeVar("T")
out = Console(soft_wrap=True)  # banner lines stay whole in logs and narrow terminals
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the terminal width
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _settings(**overrides: object) -> Settings:
    """The deployment's settings; ``overrides`` (command-line options, ``None`` = not given) win."""
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        err.print(f"[red]trustplane:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def _run(coro: Coroutine[object, object, T]) -> T:
    try:
        return asyncio.run(coro)
    except SettingsError as exc:
        err.print(f"[red]trustplane:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


async def _with_services(settings: Settings, fn: Callable[[Services], Awaitable[T]]) -> T:
    """Build the services on the deployment's database, run ``fn`` on them, dispose."""
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


def _emit_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts)) if ts else "-"
