"""The ``trustplane`` command line: one Typer app, one module per command group.

Every command module imports :mod:`trustplane.cli.common` for the shared helpers and nothing from this
package's ``__init__``, which imports them all: the imports form a tree, never a circle.
"""

from __future__ import annotations

import typer

from trustplane.cli import server
from trustplane.cli.audit import audit_app
from trustplane.cli.clients import clients_app, regtoken_app
from trustplane.cli.keys import keys_app
from trustplane.cli.mandates import mandates_app
from trustplane.cli.partners import partners_app
from trustplane.cli.policy import policy_app
from trustplane.cli.users import users_app

app = typer.Typer(
    help="trustplane: the identity control plane for institutional trade workflows.",
    no_args_is_help=True,
    add_completion=False,
)
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


def main() -> None:
    app()
