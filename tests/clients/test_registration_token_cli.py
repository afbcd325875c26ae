"""``trustplane registration-token create --lei``: the operator binds an initial access token to one
legal entity; bad input is one line on stderr, exit 2, nothing stored."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.cli.conftest import invoke, one_line
from tests.conftest import LEI
from trustplane.clients.model import hash_secret


def _tokens(tmp_path: Path) -> list[tuple[str, str | None]]:
    """The stored tokens (the CLI runs its own event loop, so the test is synchronous)."""
    with sqlite3.connect(tmp_path / ".trustplane" / "trustplane.db") as conn:
        return list(conn.execute("SELECT token_hash, lei FROM initial_access_tokens"))


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    migrated = invoke(tmp_path, "migrate", monkeypatch=monkeypatch)
    assert migrated.returncode == 0, migrated.stderr
    return tmp_path


def test_create_with_lei_binds_the_token(deployment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created = invoke(
        deployment, "registration-token", "create", "--lei", LEI, monkeypatch=monkeypatch
    )

    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert _tokens(deployment) == [(hash_secret(token), LEI)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--lei", LEI.lower()],
            f"trustplane: --lei: not a canonical ISO 17442 LEI: {LEI.lower()!r}",
            id="lei-lower-case",
        ),
        pytest.param(
            ["--description", "x" * 201],
            "trustplane: --description: 1 to 200 printable characters",
            id="description-too-long",
        ),
    ],
)
def test_bad_input_is_one_line_and_stores_nothing(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    refused = invoke(deployment, "registration-token", "create", *args, monkeypatch=monkeypatch)

    assert one_line(refused) == message
    assert _tokens(deployment) == []
