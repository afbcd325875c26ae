"""The ``trustplane`` command line: one Typer app, one module per command group.

Every command module imports :mod:`trustplane.cli.common` for the shared helpers and nothing from this
package's ``__init__``, which imports them all: the imports form a tree, never a circle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustplane.cli import common, demo, reference_serve, server
from trustplane.cli.audit import audit_app
from trustplane.cli.clients import clients_app, regtoken_app
from trustplane.cli.dev import dev_app
from trustplane.cli.entities import entities_app
from trustplane.cli.events import events_app
from trustplane.cli.keys import keys_app
from trustplane.cli.mandates import mandates_app
from trustplane.cli.partners import partners_app
from trustplane.cli.policy import policy_app
from trustplane.cli.reference import reference_app
from trustplane.cli.users import users_app

app = typer.Typer(
    help="trustplane: the identity control plane for institutional trade workflows.",
    no_args_is_help=True,
    add_completion=False,
    cls=common.OneLineErrors,
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


app.command()(server.version)
app.command()(server.migrate)
app.command()(server.serve)
app.add_typer(keys_app, name="keys")
app.add_typer(clients_app, name="clients")
app.add_typer(regtoken_app, name="registration-token")
app.add_typer(partners_app, name="partners")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")
app.add_typer(users_app, name="users")
app.add_typer(mandates_app, name="mandates")
app.add_typer(entities_app, name="entities")
app.add_typer(dev_app, name="dev")
reference_app.command("serve")(reference_serve.serve)
app.add_typer(reference_app, name="reference")
app.add_typer(events_app, name="events")
app.command()(demo.demo)


def main() -> None:
    app()
