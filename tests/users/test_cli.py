"""``trustplane users ...`` in process (Typer's runner) against a migrated SQLite database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import KEK, LEI, run_sync
from trustplane.cli import app
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade
from trustplane.users import totp

PASSWORD = "correct horse battery staple"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'trustplane.db'}"

    async def migrate() -> None:
        db = Database(url)
        await upgrade(db)
        await db.dispose()

    run_sync(migrate())
    return {
        "TRUSTPLANE_DATABASE_URL": url,
        "TRUSTPLANE_DATA_DIR": str(tmp_path),
        "TRUSTPLANE_KEY_ENCRYPTION_KEY": KEK,
        "TRUSTPLANE_LOG_LEVEL": "warning",
    }


def cli(env: dict[str, str], *args: str, stdin: str | None = None, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args), env=env, input=stdin)
    assert result.exit_code == code, result.output
    return result.output


def test_users_lifecycle(env: dict[str, str]) -> None:
    added = json.loads(
        cli(
            env,
            "users",
            "add",
            "Alice",
            "--lei",
            LEI,
            "--name",
            "Alice Trader",
            "--password-stdin",
            "--json",
            stdin=PASSWORD + "\n",
        )
    )
    assert added["username"] == "alice"
    assert added["lei"] == LEI
    assert added["totp"] is False
    listed = json.loads(cli(env, "users", "list", "--json"))
    assert [u["user_id"] for u in listed] == [added["user_id"]]
    enrolment = json.loads(cli(env, "users", "enable-totp", "alice", "--json"))
    assert enrolment["otpauth_uri"].startswith("otpauth://totp/")
    assert len(totp.now_code(enrolment["secret"])) == 6
    assert json.loads(cli(env, "users", "show", "alice", "--json"))["totp"] is True
    assert "disabled" in cli(env, "users", "disable", "alice")
    assert json.loads(cli(env, "users", "show", "alice", "--json"))["status"] == "disabled"
    assert "active" in cli(env, "users", "enable", "alice")
    assert "changed" in cli(
        env, "users", "set-password", "alice", "--password-stdin", stdin="another long passphrase\n"
    )


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("--lei", "NOT-A-LEI"), PASSWORD, "not a valid ISO 17442 LEI"),
        (("--lei", LEI), "short", "at least 12"),
    ],
)
def test_users_add_refusals_exit_1_with_one_line(
    env: dict[str, str], args: tuple[str, ...], stdin: str, message: str
) -> None:
    output = cli(
        env,
        "users",
        "add",
        "bob",
        "--name",
        "Bob",
        *args,
        "--password-stdin",
        stdin=stdin + "\n",
        code=1,
    )
    assert message in output


def test_unknown_user_exits_1(env: dict[str, str]) -> None:
    assert "no user" in cli(env, "users", "show", "nobody", code=1)
