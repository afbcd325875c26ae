"""The ``trustplane`` command line: one Typer app, one module per command group, loaded on demand.

The root group knows every command by name and one-line help (:data:`COMMANDS`) and imports a
command's module only when that command runs or shows its own help: ``trustplane --help`` imports
Typer and nothing else of trustplane's, and ``trustplane keys list`` the keys commands and what they
call, never the demo, the reference services or the other groups. A test keeps the help lines here
equal to the commands' own (tests/cli/test_lazy_commands.py).

Every command module imports :mod:`trustplane.cli.common` for the shared helpers and nothing from this
package's ``__init__``: the imports form a tree, never a circle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.main import get_command_from_info, get_group_from_info
from typer.models import CommandInfo, TyperInfo

from trustplane.cli import common
from trustplane.startup import quiet_gc


@dataclass(frozen=True)
class Lazy:
    """A command of the root group before it is imported."""

    #: ``module:attribute``: a Typer app (a command group) or a command function
    target: str
    #: the first paragraph of its help, for ``trustplane --help`` (the same text as the command's)
    help: str


#: Every command of ``trustplane``, in the order ``--help`` lists them.
COMMANDS: dict[str, Lazy] = {
    "version": Lazy("trustplane.cli.server:version", "Print the version."),
    "migrate": Lazy(
        "trustplane.cli.server:migrate",
        "Bring the database schema up to date (Alembic) and create the signing keys if there "
        "are none.",
    ),
    "serve": Lazy(
        "trustplane.cli.server:serve",
        "Run the server. First start: migrates the database and generates the signing keys.",
    ),
    "demo": Lazy(
        "trustplane.cli.demo:demo",
        "Start three deployments (arranger, broker, clearing) and the reference services on "
        "loopback, run the whole reference lifecycle (the mandate revoked before settlement "
        "included), print the chain of authority, verify each ledger offline, stop everything.",
    ),
    "keys": Lazy("trustplane.cli.keys:keys_app", "Token-signing keys."),
    "clients": Lazy("trustplane.cli.clients:clients_app", "Registered clients."),
    "registration-token": Lazy(
        "trustplane.cli.clients:regtoken_app", "Initial access tokens for dynamic registration."
    ),
    "partners": Lazy("trustplane.cli.partners:partners_app", "Federated partners: trust profiles."),
    "audit": Lazy("trustplane.cli.audit:audit_app", "The tamper-evident audit ledger."),
    "policy": Lazy(
        "trustplane.cli.policy:policy_app",
        "Policy bundles: validate, test, publish, activate, roll back, diff, simulate.",
    ),
    "users": Lazy("trustplane.cli.users:users_app", "Local users (login at /authorize)."),
    "mandates": Lazy(
        "trustplane.cli.mandates:mandates_app", "Mandates: durable, versioned delegations."
    ),
    "entities": Lazy(
        "trustplane.cli.entities:entities_app",
        "Entity directory: legal names shown beside LEIs on the login and consent pages.",
    ),
    "dev": Lazy("trustplane.cli.dev:dev_app", "Developer helpers (not for production)."),
    "reference": Lazy(
        "trustplane.cli.reference:reference_app",
        "Reference settlement services: exceptions, outbox publishing and forwarding.",
    ),
    "events": Lazy(
        "trustplane.cli.events:events_app", "The authorization server's signed security events."
    ),
}

_loaded: dict[str, typer.Typer | Callable[..., None]] = {}


def load(name: str) -> typer.Typer | Callable[..., None]:
    """Import the command ``name``: its Typer app or its function (once per process)."""
    if name not in _loaded:
        module, _, attribute = COMMANDS[name].target.partition(":")
        with quiet_gc():  # trustplane.startup: the collector would walk every new module meanwhile
            target = getattr(importlib.import_module(module), attribute)
        if name == "reference":  # the services' server lives in its own module
            from trustplane.cli import reference_serve

            target.command("serve")(reference_serve.serve)
        _loaded[name] = target
    return _loaded[name]


class _Commands(MutableMapping[str, Any]):  # Click's Command: vendored by recent Typer versions
    """The root group's commands: every name of :data:`COMMANDS` is there; a command is imported
    and built the first time it is looked up."""

    def __init__(self, group: LazyGroup) -> None:
        self._group = group
        self._built: dict[str, typer.core.TyperCommand | typer.core.TyperGroup] = {}

    def __getitem__(self, name: str) -> typer.core.TyperCommand | typer.core.TyperGroup:
        if name not in self._built:
            if name not in COMMANDS:
                raise KeyError(name)
            self._built[name] = self._group.build(name)
        return self._built[name]

    def __setitem__(
        self, name: str, command: typer.core.TyperCommand | typer.core.TyperGroup
    ) -> None:
        raise TypeError(f"the root command group is fixed (trustplane.cli.COMMANDS): {name}")

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"the root command group is fixed (trustplane.cli.COMMANDS): {name}")

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS


class LazyGroup(common.OneLineErrors):
    """The root group: :data:`COMMANDS`, each imported when it is run or asked for its help."""

    def __init__(self, **attrs: object) -> None:
        super().__init__(**attrs)  # type: ignore[arg-type]  # Typer passes its own keywords
        self.commands = _Commands(self)

    def build(self, name: str) -> typer.core.TyperCommand | typer.core.TyperGroup:
        """The Click command of ``name``, built as ``add_typer`` / ``command()`` would."""
        target = load(name)
        if isinstance(target, typer.Typer):
            return get_group_from_info(
                TyperInfo(target, name=name),
                pretty_exceptions_short=app.pretty_exceptions_short,
                suggest_commands=self.suggest_commands,
                rich_markup_mode=self.rich_markup_mode,
            )
        command = get_command_from_info(
            CommandInfo(name=name, callback=target),
            pretty_exceptions_short=app.pretty_exceptions_short,
            rich_markup_mode=self.rich_markup_mode,
        )
        assert isinstance(command, typer.core.TyperCommand)
        return command

    def list_commands(self, ctx: typer.Context) -> list[str]:  # type: ignore[override]
        return list(COMMANDS)

    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:  # type: ignore[override]
        """The command list of ``trustplane --help`` from :data:`COMMANDS`, importing none: each
        help shortened as Click shortens a command's own."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [
            (name, typer.core.TyperCommand(name, help=lazy.help).get_short_help_str(limit))
            for name, lazy in COMMANDS.items()
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    help="trustplane: the identity control plane for institutional trade workflows.",
    no_args_is_help=True,
    add_completion=False,
    cls=LazyGroup,
    rich_markup_mode=None,
)


@app.callback()
def deployment(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="The deployment's data directory (TRUSTPLANE_DATA_DIR; default .trustplane in "
            "the current directory).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Options for every command: where the deployment is."""
    common.global_options.clear()
    common.global_options["data_dir"] = data_dir


def main() -> None:
    app()
