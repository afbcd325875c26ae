"""Issue 11 item 10: a start-up problem is one line on stderr naming the setting (or the option the
operator typed) and what to do, exit code 2, never a traceback, and nothing is created."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import Outcome, files_under, invoke, one_line, run
from tests.conftest import KEK


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Outcome]:
    def call(cwd: Path, *args: str, **env: str) -> Outcome:
        return invoke(cwd, *args, monkeypatch=monkeypatch, **env)

    return call


SCOPES_WITH_A_GENERIC_SCOPE = """
[resources."https://execution.example/api"]
description = "execution"
[scopes."order:all"]
resources = ["https://execution.example/api"]
"""


@pytest.mark.parametrize("command", [("keys", "list"), ("migrate",)])
def test_an_unreachable_postgresql_is_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    """A subprocess: the whole command, as an operator sees it (it was a 527-line traceback)."""
    url = "postgresql://postgres@127.0.0.1:1/trustplane"  # nothing listens on port 1

    line = one_line(
        run(tmp_path, *command, TRUSTPLANE_DATABASE_URL=url, TRUSTPLANE_KEY_ENCRYPTION_KEY=KEK)
    )

    assert line.startswith(
        "trustplane: invalid setting TRUSTPLANE_DATABASE_URL: cannot connect to PostgreSQL at "
        "127.0.0.1:1/trustplane: "
    )
    assert line.endswith("check TRUSTPLANE_DATABASE_URL and that the database server is running")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mysql://ops:s3cret@db.example/trustplane", "unsupported scheme 'mysql'"),
        (
            "postgresql+psycopg2://ops:s3cret@db.example/x",
            "unsupported scheme 'postgresql+psycopg2'",
        ),
        ("oracle+cx_oracle://ops:s3cret@db/x", "unsupported scheme 'oracle+cx_oracle'"),
        ("s3cret-but-not-a-url", "not a database URL"),
        ("://ops:s3cret@", "not a database URL"),
    ],
)
def test_an_unusable_database_url_is_refused_when_settings_load(
    tmp_path: Path, cli: Callable[..., Outcome], url: str, reason: str
) -> None:
    line = one_line(cli(tmp_path, "keys", "list", TRUSTPLANE_DATABASE_URL=url))

    assert line == (
        f"trustplane: invalid setting TRUSTPLANE_DATABASE_URL: Value error, {reason}: use "
        "postgresql://USER@HOST:PORT/NAME or sqlite:///PATH"
    )
    assert "s3cret" not in line  # a URL may carry a password: never echoed


@pytest.mark.parametrize("command", [("migrate",), ("keys", "list"), ("users", "list")])
@pytest.mark.parametrize("under", ["", "sub/dir"], ids=["is-a-file", "under-a-file"])
def test_a_data_directory_that_is_a_file_is_one_line(
    tmp_path: Path, cli: Callable[..., Outcome], command: tuple[str, ...], under: str
) -> None:
    (tmp_path / "notes.txt").write_text("not a directory\n")
    data_dir = tmp_path / "notes.txt" / under if under else tmp_path / "notes.txt"

    line = one_line(cli(tmp_path, *command, TRUSTPLANE_DATA_DIR=str(data_dir)))

    assert line == (
        f"trustplane: invalid setting TRUSTPLANE_DATA_DIR: {tmp_path / 'notes.txt'} is a file, "
        "not a directory: point --data-dir / TRUSTPLANE_DATA_DIR at a writable directory"
    )
    assert files_under(tmp_path) == ["notes.txt"]


def test_a_sqlite_database_url_under_a_file_names_the_url_setting(
    tmp_path: Path, cli: Callable[..., Outcome]
) -> None:
    (tmp_path / "notes.txt").write_text("x\n")
    url = f"sqlite:///{tmp_path / 'notes.txt' / 'trustplane.db'}"

    line = one_line(cli(tmp_path, "migrate", TRUSTPLANE_DATABASE_URL=url))

    assert line.startswith("trustplane: invalid setting TRUSTPLANE_DATABASE_URL: ")
    assert f"{tmp_path / 'notes.txt'} is a file, not a directory" in line


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody may write, root included (the tests run as root in CI, where chmod alone
    does not stop a write): the immutable attribute."""
    folder = tmp_path / "ro"
    folder.mkdir()
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    if made.returncode != 0:
        folder.chmod(0o555)  # enough for a non-root user
        if not _unwritable(folder):
            pytest.skip(f"cannot make a read-only directory here: {made.stderr!r}")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=False)
    folder.chmod(0o755)


def _unwritable(folder: Path) -> bool:
    try:
        (folder / "probe").touch()
    except OSError:
        return True
    (folder / "probe").unlink()
    return False


@pytest.mark.parametrize("data_dir", ["", "data"], ids=["itself", "inside"])
def test_a_read_only_data_directory_is_one_line(
    read_only_dir: Path, cli: Callable[..., Outcome], data_dir: str
) -> None:
    target = read_only_dir / data_dir if data_dir else read_only_dir

    line = one_line(cli(read_only_dir.parent, "migrate", TRUSTPLANE_DATA_DIR=str(target)))

    assert line == (
        f"trustplane: invalid setting TRUSTPLANE_DATA_DIR: directory {read_only_dir} is read-only: "
        "point --data-dir / TRUSTPLANE_DATA_DIR at a writable directory"
    )
    assert files_under(read_only_dir) == []


@pytest.mark.parametrize(
    "command", [("migrate",), ("keys", "list"), ("partners", "validate", "p.yaml")]
)
def test_a_scope_file_with_a_generic_scope_is_one_line(
    tmp_path: Path, cli: Callable[..., Outcome], command: tuple[str, ...]
) -> None:
    """``partners validate`` loads the vocabulary outside any service call: the root command group
    turns the error into the line."""
    scopes = tmp_path / "scopes.toml"
    scopes.write_text(SCOPES_WITH_A_GENERIC_SCOPE)
    (tmp_path / "p.yaml").write_text("partner_id: p\n")
    if command[0] == "keys":  # an existing deployment, made before the scope file went wrong
        assert cli(tmp_path, "migrate", TRUSTPLANE_DATA_DIR="data").returncode == 0
        before = files_under(tmp_path / "data")

    line = one_line(
        cli(tmp_path, *command, TRUSTPLANE_SCOPES_FILE=str(scopes), TRUSTPLANE_DATA_DIR="data")
    )

    assert line == (
        f"trustplane: invalid setting TRUSTPLANE_SCOPES_FILE: {scopes}: scope 'order:all' is too "
        "generic: name a business verb on an object"
    )
    if command[0] == "keys":
        assert files_under(tmp_path / "data") == before
    else:
        assert not (tmp_path / "data").exists()  # refused before the deployment is touched


def test_serve_with_a_generic_scope_stops_before_the_server_starts(tmp_path: Path) -> None:
    scopes = tmp_path / "scopes.toml"
    scopes.write_text(SCOPES_WITH_A_GENERIC_SCOPE)

    line = one_line(run(tmp_path, "serve", "--port", "1", TRUSTPLANE_SCOPES_FILE=str(scopes)))

    assert line.startswith("trustplane: invalid setting TRUSTPLANE_SCOPES_FILE: ")
    assert files_under(tmp_path) == ["scopes.toml"]


def test_a_missing_scope_file_is_one_line(tmp_path: Path, cli: Callable[..., Outcome]) -> None:
    line = one_line(cli(tmp_path, "migrate", TRUSTPLANE_SCOPES_FILE=str(tmp_path / "none.toml")))

    assert line.startswith(
        f"trustplane: invalid setting TRUSTPLANE_SCOPES_FILE: cannot read scope vocabulary "
        f"{tmp_path / 'none.toml'}: "
    )


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--port", "99999", "Input should be less than or equal to 65535"),
        ("--port", "0", "Input should be greater than or equal to 1"),
        ("--workers", "65", "Input should be less than or equal to 64"),
    ],
)
def test_a_wrong_option_is_named_as_the_option(
    tmp_path: Path, option: str, value: str, reason: str
) -> None:
    line = one_line(run(tmp_path, "serve", option, value))

    assert line == f"trustplane: invalid option {option}: {reason}"
    assert files_under(tmp_path) == []


def test_the_same_value_from_the_environment_is_named_as_the_variable(tmp_path: Path) -> None:
    line = one_line(run(tmp_path, "serve", TRUSTPLANE_PORT="99999"))

    assert line == (
        "trustplane: invalid setting TRUSTPLANE_PORT: Input should be less than or equal to 65535"
    )


@pytest.mark.postgres
def test_a_missing_kek_with_postgresql_is_one_line(
    tmp_path: Path, cli: Callable[..., Outcome], pg_database: str
) -> None:
    """Raised while the services are built, after the database answered: still one line."""
    line = one_line(cli(tmp_path, "keys", "list", TRUSTPLANE_DATABASE_URL=pg_database))

    assert line == (
        "trustplane: invalid setting TRUSTPLANE_KEY_ENCRYPTION_KEY: required when the database is "
        "not the embedded SQLite file (generate one with `trustplane keys new-kek`)"
    )
