"""``trustplane registration-token create --lei``: the operator binds an initial access token to one
legal entity, or asks for an unbound one explicitly (``--any-lei``, with a warning); neither, and bad
input, is one line on stderr, exit 2, nothing stored."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from tests.cli.conftest import invoke, one_line
from tests.conftest import LEI
from trustplane.cli.clients import ANY_LEI_WARNING
from trustplane.clients.model import hash_secret
from trustplane.errors import InvalidTokenError
from trustplane.services import Services


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


def _events(tmp_path: Path, type_: str) -> list[dict[str, object]]:
    with sqlite3.connect(tmp_path / ".trustplane" / "trustplane.db") as conn:
        rows = list(conn.execute("SELECT entry, payload FROM audit_pending"))
    return [json.loads(p) for e, p in rows if json.loads(e)["type"] == type_]


def _list(deployment: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> list[dict[str, object]]:
    listed = invoke(
        deployment, "registration-token", "list", "--json", *args, monkeypatch=monkeypatch
    )
    assert listed.returncode == 0, listed.stderr
    body: list[dict[str, object]] = json.loads(listed.stdout)
    return body


def test_list_and_revoke(deployment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``list`` names each token by its hash's first 16 hex digits (never the token); ``revoke``
    ends it for registration, audited once; a second revoke, an unknown id and a malformed one are
    one stderr line each (exit 1, 1, 2) and write nothing."""
    created = invoke(
        deployment, "registration-token", "create", "--lei", LEI, "--uses", "3",
        "--description", "desk onboarding", "--json", monkeypatch=monkeypatch,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    token, id_ = made["initial_access_token"], made["id"]
    assert id_ == hash_secret(token)[:16]

    listed = _list(deployment, monkeypatch)
    assert [(t["id"], t["state"], t["lei"], t["uses"], t["max_uses"]) for t in listed] == [
        (id_, "active", LEI, 0, 3)
    ]
    assert token not in json.dumps(listed)
    table = invoke(deployment, "registration-token", "list", monkeypatch=monkeypatch)
    assert id_ in table.stdout  # whole, on one line, whatever the terminal's width
    assert "desk" in table.stdout

    revoked = invoke(deployment, "registration-token", "revoke", id_, monkeypatch=monkeypatch)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == f"revoked {id_} (desk onboarding, 0 uses)"
    assert _list(deployment, monkeypatch) == []  # active ones only by default
    [gone] = _list(deployment, monkeypatch, "--all")
    assert (gone["id"], gone["state"]) == (id_, "revoked")
    assert isinstance(gone["revoked_at"], int)
    events = _events(deployment, "oauth:registration_token:revoked")
    assert [(e["token_id"], e["lei"], e["uses"]) for e in events] == [(id_, LEI, 0)]

    again = invoke(deployment, "registration-token", "revoke", id_, monkeypatch=monkeypatch)
    assert (again.returncode, again.stdout) == (1, "")
    assert (
        again.stderr == f"trustplane: no initial access token {id_} that is not revoked already\n"
    )
    unknown = invoke(
        deployment, "registration-token", "revoke", "0123456789abcdef", monkeypatch=monkeypatch
    )
    assert unknown.returncode == 1
    for bad in (id_.upper(), id_[:15], id_ + "\n", token):
        malformed = invoke(
            deployment, "registration-token", "revoke", "--", bad, monkeypatch=monkeypatch
        )
        assert malformed.returncode == 2, bad
        assert one_line(malformed).startswith(
            "trustplane: not a token id (16 lowercase hex digits)"
        )
    assert len(_events(deployment, "oauth:registration_token:revoked")) == 1


async def test_a_revoked_token_registers_nothing(services: Services) -> None:
    """The registration endpoint's gate (``check_initial_access_token`` and the atomic use inside
    ``register``) refuses a revoked token; the client store is untouched."""
    token = await services.clients.create_initial_access_token("t", lei=LEI)
    await services.clients.check_initial_access_token(token)  # usable before
    [info] = await services.clients.initial_access_tokens()
    await services.clients.revoke_initial_access_token(info.id)

    with pytest.raises(InvalidTokenError):
        await services.clients.check_initial_access_token(token)
    before = len(await services.clients.list())
    with pytest.raises(InvalidTokenError):
        await services.clients.register(
            {"client_name": "x", "lei": LEI, "grant_types": ["client_credentials"],
             "token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": []}},
            initial_access_token=token,
        )  # fmt: skip
    assert len(await services.clients.list()) == before
    with pytest.raises(LookupError):
        await services.clients.revoke_initial_access_token(info.id)


async def test_racing_revocations_one_wins(services: Services) -> None:
    """Eight revocations of one token at once (on PostgreSQL: eight connections): exactly one
    revokes it, the rest are told it is revoked already."""
    await services.clients.create_initial_access_token("raced", lei=LEI)
    [info] = await services.clients.initial_access_tokens()

    async def revoke() -> bool:
        try:
            await services.clients.revoke_initial_access_token(info.id)
        except LookupError:
            return False
        return True

    outcomes = await asyncio.gather(*(revoke() for _ in range(8)))

    assert sorted(outcomes) == [False] * 7 + [True]
    [after] = await services.clients.initial_access_tokens()
    assert after.state(int(time.time())) == "revoked"
