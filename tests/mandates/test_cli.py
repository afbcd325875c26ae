"""``trustplane mandates``: the real command line on the embedded default database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_sync
from tests.mandates.conftest import GRANTOR, TRADE, grantee
from trustplane.app import Services
from trustplane.settings import Settings

TRUSTPLANE = str(Path(sys.executable).parent / "trustplane")


def cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
    env.update(TRUSTPLANE_DATA_DIR=str(data), COLUMNS="200", TRUSTPLANE_LOG_LEVEL="warning")
    return subprocess.run(
        [TRUSTPLANE, *args],
        env=env,
        cwd=data,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(data: Path, *args: str) -> Any:
    result = cli(data, *args, "--json")
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    data = tmp_path_factory.mktemp("cli")
    assert cli(data, "migrate").returncode == 0

    async def register() -> str:
        svc = Services.build(Settings(data_dir=data))
        await svc.start()
        try:
            return (await grantee(svc)).client_id
        finally:
            await svc.stop()

    return data, run_sync(register())


def test_lifecycle(setup: tuple[Path, str]) -> None:
    data, client_id = setup
    details = data / "details.json"
    details.write_text(json.dumps([TRADE]))
    until = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 40 * 86400))

    created = ok(
        data, "mandates", "create", "--grantor-lei", GRANTOR, "--grantee", client_id,
        "--scope", "order:create", "--details-file", str(details), "--until", until,
        "--legal-basis", "onboarding_agreement", "--document-ref", "OA-7", "--grantor-person", "alice",
    )  # fmt: skip
    mid = created["id"]
    assert (created["status"], created["legal_basis"], created["version"]) == (
        "proposed",
        "onboarding_agreement",
        1,
    )

    assert ok(data, "mandates", "accept", mid, "--by", "alice")["status"] == "active"
    amended = ok(
        data,
        "mandates",
        "amend",
        mid,
        "--scope",
        "order:create",
        "--scope",
        "order:cancel",
        "--reason",
        "add cancel",
    )
    assert (amended["version"], amended["scopes"]) == (2, ["order:cancel", "order:create"])
    assert ok(data, "mandates", "show", mid, "--version", "1")["status"] == "superseded"
    assert ok(data, "mandates", "suspend", mid, "--reason", "review")["status"] == "suspended"
    assert ok(data, "mandates", "resume", mid)["status"] == "active"

    listed = ok(
        data,
        "mandates",
        "list",
        "--grantor",
        GRANTOR,
        "--status",
        "active",
        "--expiring-within",
        "60",
    )
    assert [m["id"] for m in listed] == [mid]
    assert ok(data, "mandates", "list", "--expiring-within", "10") == []

    assert ok(data, "mandates", "revoke", mid, "--reason", "withdrawn")["status"] == "revoked"
    history = ok(data, "mandates", "history", mid)
    assert [c["action"] for c in history["changes"]] == [
        "created",
        "accepted",
        "amended",
        "suspended",
        "resumed",
        "revoked",
    ]
    assert history["changes"][0]["actor"].startswith("cli:")

    table = cli(data, "mandates", "show", mid)
    assert table.returncode == 0
    assert "Maximum notional per order" in table.stdout
    assert "EUR 5,000,000.00" in table.stdout
    assert mid in cli(data, "mandates", "list").stdout
    assert "revoked" in cli(data, "mandates", "history", mid).stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["revoke", "mdt_missing"], "no mandate mdt_missing"),
        (
            ["create", "--grantor-lei", GRANTOR, "--grantee", "nobody", "--scope", "order:create"],
            "not an active client",
        ),
        (
            [
                "create",
                "--grantor-lei",
                GRANTOR,
                "--grantee",
                "{client}",
                "--scope",
                "order:create",
                "--details",
                '[{"type": "loan"}]',
            ],
            "invalid_authorization_details: authorization_details[0]: unknown type 'loan'",
        ),
        (
            [
                "create",
                "--grantor-lei",
                GRANTOR,
                "--grantee",
                "{client}",
                "--scope",
                "order:create",
                "--until",
                "tomorrow",
            ],
            "--until: not a date or time",
        ),
    ],
)
def test_errors_are_one_line(setup: tuple[Path, str], args: list[str], message: str) -> None:
    data, client_id = setup
    result = cli(data, "mandates", *[a.replace("{client}", client_id) for a in args])
    assert result.returncode in (1, 2)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
