"""``trustplane users ...``: local users who log in at the authorization endpoint.

Passwords are read from a prompt (hidden, confirmed) or, for scripts, from ``--password-stdin``;
never from an argument, where they would end up in shell history and ``ps``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.table import Table

from trustplane.cli.common import JsonFlag, _emit_json, _run, _settings, _with_services, err, out

if TYPE_CHECKING:
    from trustplane.services import Services

T = TypeVar("T")

users_app: typer.Typer = typer.Typer(
    help="Local users (login at /authorize).", no_args_is_help=True
)
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input.")
]


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


def _call(fn: Callable[[Services], Awaitable[T]]) -> T:
    from trustplane.users.model import UserError

    try:
        return _run(_with_services(_settings(), fn))
    except UserError as exc:
        err.print(f"[red]trustplane:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None


@users_app.command("add")
def users_add(
    username: str,
    lei: Annotated[str, typer.Option(help="ISO 17442 LEI of the user's legal entity.")],
    name: Annotated[str, typer.Option(help="Display name (shown on the consent page).")],
    password_stdin: PasswordStdin = False,
    as_json: JsonFlag = False,
) -> None:
    """Create a user bound to a legal entity."""
    password = _password(password_stdin)
    user = _call(lambda svc: svc.authorization.users.add(username, name, lei, password))
    if as_json:
        _emit_json(user.public())
    else:
        out.print(f"user {user.username} created: sub {user.user_id}, lei {user.lei}")


@users_app.command("list")
def users_list(as_json: JsonFlag = False) -> None:
    """List users."""
    users = _call(lambda svc: svc.authorization.users.list())
    if as_json:
        _emit_json([u.public() for u in users])
        return
    table = Table("username", "sub", "name", "lei", "status", "totp", "failures")
    for u in users:
        table.add_row(
            u.username,
            u.user_id,
            u.display_name,
            u.lei,
            u.status.value,
            "yes" if u.totp_enabled else "no",
            str(u.failed_logins),
        )
    out.print(table)


@users_app.command("show")
def users_show(username: str, as_json: JsonFlag = False) -> None:
    """Show one user."""
    body = _call(lambda svc: svc.authorization.users.get(username)).public()
    if as_json:
        _emit_json(body)
        return
    for key, value in body.items():
        if (
            key in ("locked_until", "created_at", "last_login_at")
            and isinstance(value, int)
            and value
        ):
            value = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))
        out.print(f"{key:<14} {value}", highlight=False)


@users_app.command("disable")
def users_disable(username: str) -> None:
    """Disable a user: no further logins; consent in an open session is refused."""
    from trustplane.users.model import UserStatus

    _call(lambda svc: svc.authorization.users.set_status(username, UserStatus.DISABLED))
    out.print(f"user {username} is now disabled")


@users_app.command("enable")
def users_enable(username: str) -> None:
    """Re-enable a user (also clears a lockout)."""
    from trustplane.users.model import UserStatus

    _call(lambda svc: svc.authorization.users.set_status(username, UserStatus.ACTIVE))
    out.print(f"user {username} is now active")


@users_app.command("set-password")
def users_set_password(username: str, password_stdin: PasswordStdin = False) -> None:
    """Set a new password (also clears a lockout)."""
    password = _password(password_stdin)
    _call(lambda svc: svc.authorization.users.set_password(username, password))
    out.print(f"password of {username} changed")


@users_app.command("enable-totp")
def users_enable_totp(username: str, as_json: JsonFlag = False) -> None:
    """Enrol (or re-enrol) a TOTP authenticator; prints the seed and otpauth:// URI once."""
    enrolment = _call(lambda svc: svc.authorization.users.enable_totp(username))
    if as_json:
        _emit_json({"secret": enrolment.secret, "otpauth_uri": enrolment.uri})
        return
    out.print(f"secret  {enrolment.secret}", highlight=False)
    out.print(f"uri     {enrolment.uri}", highlight=False)
    out.print("shown once: add it to the user's authenticator app now")
