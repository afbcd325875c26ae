"""Issue 11 item 11: a command finds its deployment through the settings (``--data-dir``,
``TRUSTPLANE_DATA_DIR``, ``TRUSTPLANE_DATABASE_URL``), never by creating one. Only ``migrate`` and
``serve`` create; every other command, run where there is no deployment, creates nothing (no
directory, no SQLite file, no key file) and exits 2 naming the path it looked at and the settings
that move it."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import Outcome, files_under, invoke, one_line, run
from tests.conftest import KEK, run_sync

MOVE_IT = (
    "run the command where the deployment's .trustplane directory is, or point --data-dir / "
    "TRUSTPLANE_DATA_DIR (or TRUSTPLANE_DATABASE_URL) at it"
)
NEW_INSTEAD = "`trustplane migrate` would create a new, empty deployment instead"

COMMANDS_ON_A_DEPLOYMENT = [
    ("keys", "list"),
    ("keys", "rotate"),
    ("keys", "prune"),
    ("clients", "list"),
    ("clients", "show", "c-1"),
    ("clients", "disable", "c-1"),
    ("registration-token", "create"),
    ("users", "list"),
    ("users", "show", "alice"),
    ("mandates", "list"),
    ("mandates", "show", "m-1"),
    ("policy", "list"),
    ("partners", "list"),
    ("audit", "checkpoint"),
    ("audit", "public-key"),
    ("audit", "retention"),
]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Outcome]:
    def call(cwd: Path, *args: str, **env: str) -> Outcome:
        return invoke(cwd, *args, monkeypatch=monkeypatch, **env)

    return call


@pytest.mark.parametrize("command", COMMANDS_ON_A_DEPLOYMENT, ids=" ".join)
def test_a_command_where_there_is_no_deployment_creates_nothing(
    tmp_path: Path, cli: Callable[..., Outcome], command: tuple[str, ...]
) -> None:
    line = one_line(cli(tmp_path, *command))

    assert line == (
        f"trustplane: there is no database at {tmp_path / '.trustplane' / 'trustplane.db'} "
        f"(TRUSTPLANE_DATA_DIR): {MOVE_IT}; {NEW_INSTEAD}"
    )
    assert files_under(tmp_path) == []


def test_the_same_from_a_subprocess(tmp_path: Path) -> None:
    line = one_line(run(tmp_path, "clients", "list"))

    assert str(tmp_path / ".trustplane" / "trustplane.db") in line
    assert files_under(tmp_path) == []


def test_a_configured_data_directory_that_does_not_exist_is_named(
    tmp_path: Path, cli: Callable[..., Outcome]
) -> None:
    line = one_line(cli(tmp_path, "keys", "list", TRUSTPLANE_DATA_DIR="srv/tp"))

    assert f"there is no database at {tmp_path / 'srv' / 'tp' / 'trustplane.db'}" in line
    assert files_under(tmp_path) == []


@pytest.fixture
def deployment(tmp_path: Path, cli: Callable[..., Outcome]) -> Path:
    """A deployment made by ``trustplane migrate`` in ``tmp_path/ops`` (the default data dir)."""
    ops = tmp_path / "ops"
    ops.mkdir()
    made = cli(ops, "migrate")
    assert made.returncode == 0, made.stderr
    return ops / ".trustplane"


def test_a_deployment_in_a_folder_above_is_named_not_used(
    deployment: Path, cli: Callable[..., Outcome]
) -> None:
    below = deployment.parent / "reports" / "2026"
    below.mkdir(parents=True)

    line = one_line(cli(below, "keys", "list"))

    assert f"there is one at {deployment}: --data-dir {deployment}" in line
    assert files_under(below) == []


def test_data_dir_option_and_variable_find_the_deployment_from_anywhere(
    deployment: Path, cli: Callable[..., Outcome], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    by_option = cli(elsewhere, "--data-dir", str(deployment), "keys", "list", "--json")
    by_variable = cli(elsewhere, "keys", "list", "--json", TRUSTPLANE_DATA_DIR=str(deployment))

    assert by_option.returncode == 0, by_option.stderr
    assert [k["state"] for k in json.loads(by_option.stdout)] == ["active", "next"]
    assert by_variable.stdout == by_option.stdout
    assert files_under(elsewhere) == []


def test_a_missing_key_encryption_key_file_is_not_replaced(
    tmp_path: Path, cli: Callable[..., Outcome]
) -> None:
    """Made with an explicit KEK (no kek.b64), then used without it: a new key file would decrypt
    nothing, so none is made and the line says what to restore or set."""
    assert cli(tmp_path, "migrate", TRUSTPLANE_KEY_ENCRYPTION_KEY=KEK).returncode == 0
    before = files_under(tmp_path)

    line = one_line(cli(tmp_path, "keys", "list"))

    assert line == (
        f"trustplane: no key-encryption key at {tmp_path / '.trustplane' / 'kek.b64'} "
        "(TRUSTPLANE_DATA_DIR): restore the file, or set TRUSTPLANE_KEY_ENCRYPTION_KEY to the key "
        "the deployment was created with"
    )
    assert files_under(tmp_path) == before
    assert cli(tmp_path, "keys", "list", TRUSTPLANE_KEY_ENCRYPTION_KEY=KEK).returncode == 0


def test_a_database_without_the_schema_names_the_file(
    tmp_path: Path, cli: Callable[..., Outcome]
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "trustplane.db").touch()

    line = one_line(
        cli(
            tmp_path,
            "clients",
            "list",
            TRUSTPLANE_DATA_DIR="data",
            TRUSTPLANE_KEY_ENCRYPTION_KEY=KEK,
        )
    )

    assert line == (
        f"trustplane: the database schema of SQLite file {tmp_path / 'data' / 'trustplane.db'} is "
        "not up to date (TRUSTPLANE_DATA_DIR): run `trustplane migrate` with the same settings"
    )


@pytest.fixture
def empty_pg_database() -> Iterator[str]:
    from tests.conftest import pg_admin, require_service

    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"tp_cli_empty_{secrets.token_hex(4)}"
    run_sync(pg_admin(f'CREATE DATABASE "{name}"'))
    yield name
    run_sync(pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.postgres
def test_a_postgresql_database_without_the_schema_is_named_without_credentials(
    tmp_path: Path, cli: Callable[..., Outcome], empty_pg_database: str
) -> None:
    url = f"postgresql://postgres:not-the-password@127.0.0.1:5432/{empty_pg_database}"

    line = one_line(
        cli(
            tmp_path,
            "users",
            "list",
            TRUSTPLANE_DATABASE_URL=url,
            TRUSTPLANE_KEY_ENCRYPTION_KEY=KEK,
        )
    )

    assert line == (
        f"trustplane: the database schema of PostgreSQL at 127.0.0.1:5432/{empty_pg_database} is "
        "not up to date (TRUSTPLANE_DATABASE_URL): run `trustplane migrate` with the same settings"
    )
    assert files_under(tmp_path) == []
