"""The command line starts light: importing ``trustplane.cli`` and ``trustplane --help`` load no
server, database, demo or component module, a group's ``--help`` loads that group only, and the help
lines of the root group's table (:data:`trustplane.cli.COMMANDS`) are the commands' own.

Checked by the modules a fresh interpreter has loaded (deterministic), never by timing: the start-up
times themselves are printed by ``python bench/startup.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import cast

import pytest
import typer
from typer.core import TyperCommand, TyperGroup

from trustplane.cli import COMMANDS, app

#: What a command line that only parses its arguments must not pay for: the web framework, the
#: database, the settings model, logging with its rich tracebacks, the server and every component.
HEAVY = (
    "alembic",
    "cryptography",
    "fastapi",
    "httpx",
    "nats",
    "pydantic",
    "pydantic_settings",
    "sqlalchemy",
    "starlette",
    "structlog",
    "uvicorn",
    "trustplane.app",
    "trustplane.demo",
    "trustplane.reference",
    "trustplane.server",
    "trustplane.settings",
    "trustplane.storage",
)

_LOADED = """
import json, sys
from trustplane.cli import app
args = json.loads(sys.argv[1])
if args:
    try:
        app(args, prog_name="trustplane")
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def loaded_after(*args: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``trustplane.cli`` and running it with
    ``args`` (none: the import alone)."""
    result = subprocess.run(
        [sys.executable, "-c", _LOADED, json.dumps(list(args))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(result.stderr.splitlines()[-1]))


def heavy(modules: set[str], *allowed: str) -> list[str]:
    return sorted(
        m
        for m in modules
        if any(m == h or m.startswith(h + ".") for h in HEAVY if h not in allowed)
    )


def commands_of(modules: set[str]) -> set[str]:
    return {m for m in modules if m.startswith("trustplane.cli.")}


def test_importing_the_command_line_loads_nothing_heavy() -> None:
    modules = loaded_after()

    assert heavy(modules) == []
    assert commands_of(modules) == {"trustplane.cli.common"}


def test_the_root_help_lists_every_command_without_importing_one() -> None:
    modules = loaded_after("--help")

    assert heavy(modules) == []
    assert commands_of(modules) == {"trustplane.cli.common"}


def test_a_group_help_imports_that_group_only() -> None:
    modules = loaded_after("keys", "--help")

    assert commands_of(modules) == {"trustplane.cli.common", "trustplane.cli.keys"}
    assert heavy(modules, "pydantic") == []  # Typer itself reads some parameters with pydantic


def test_the_server_command_does_not_import_the_demo_or_the_reference_services() -> None:
    modules = loaded_after("serve", "--help")

    assert commands_of(modules) == {"trustplane.cli.common", "trustplane.cli.server"}
    assert not any(m.startswith(("trustplane.demo", "trustplane.reference")) for m in modules)
    assert "trustplane.app" not in modules  # the server is imported when it starts, not for help


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_table_help_is_the_command_help(name: str) -> None:
    root = cast(TyperGroup, typer.main.get_command(app))
    command = root.get_command(typer.Context(root), name)
    assert command is not None
    in_table = TyperCommand(name, help=COMMANDS[name].help)

    assert command.get_short_help_str(1000) == in_table.get_short_help_str(1000)
    assert command.name == name


def test_the_table_and_the_root_group_agree() -> None:
    root = cast(TyperGroup, typer.main.get_command(app))

    assert root.list_commands(typer.Context(root)) == list(COMMANDS)
    assert root.get_command(typer.Context(root), "no-such-command") is None
