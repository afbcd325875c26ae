"""``trustplane registration-token create --lei``: the operator binds an initial access token to one
legal entity, or asks for an unbound one explicitly (``--any-lei``, with a warning); neither, and bad
input, is one line on stderr, exit 2, nothing stored."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.cli.conftest import invoke, one_line
from tests.conftest import LEI
from trustplane.cli.clients import ANY_LEI_WARNING
from trustplane.clients.model import hash_secret


def _tokens(tmp_path: Path) -> list[tuple[str, str | None, int]]:
    """The stored tokens (the CLI runs its own event loop, so the test is synchronous)."""
    with sqlite3.connect(tmp_path / ".trustplane" / "trustplane.db") as conn:
        return list(conn.execute("SELECT token_hash, lei, any_lei FROM initial_access_tokens"))


def _created_events(tmp_path: Path) -> list[dict[str, object]]:
    """The payloads of the ``oauth:registration_token:created`` audit events written so far."""
    with sqlite3.connect(tmp_path / ".trustplane" / "trustplane.db") as conn:
        rows = list(conn.execute("SELECT entry, payload FROM audit_pending"))
    return [
        json.loads(payload)
        for entry, payload in rows
        if json.loads(entry)["type"] == "oauth:registration_token:created"
    ]


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
    assert created.stderr == ""
    token = created.stdout.strip()
    assert _tokens(deployment) == [(hash_secret(token), LEI, 0)]
    assert [e.get("lei") for e in _created_events(deployment)] == [LEI]


def test_create_with_any_lei_warns_and_stores_an_unbound_token(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = invoke(
        deployment, "registration-token", "create", "--any-lei", "--json", monkeypatch=monkeypatch
    )

    assert created.returncode == 0, created.stderr
    assert created.stderr.splitlines() == [ANY_LEI_WARNING]
    body = json.loads(created.stdout)
    assert body["any_lei"] is True
    assert "lei" not in body
    assert _tokens(deployment) == [(hash_secret(body["initial_access_token"]), None, 1)]
    events = _created_events(deployment)
    assert [(e.get("any_lei"), e.get("lei")) for e in events] == [(True, None)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            [],
            "trustplane: name the legal entity the token registers (--lei LEI), or pass "
            "--any-lei for a token that registers any legal entity",
            id="neither-lei-nor-any-lei",
        ),
        pytest.param(
            ["--lei", LEI, "--any-lei"],
            "trustplane: --lei and --any-lei exclude each other",
            id="both",
        ),
        pytest.param(
            ["--lei", LEI.lower()],
            f"trustplane: --lei: not a canonical ISO 17442 LEI: {LEI.lower()!r}",
            id="lei-lower-case",
        ),
        pytest.param(
            ["--lei", LEI, "--description", "x" * 201],
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
    assert _created_events(deployment) == []
