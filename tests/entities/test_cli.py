"""``trustplane entities add|import|list`` in process (Typer's runner, the group's own app) against a
migrated SQLite database; the exit codes and messages of the failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import KEK, LEI, run_sync
from trustplane.cli.entities import entities_app
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

SAMPLE = Path(__file__).parent / "fixtures" / "golden_copy_sample.csv"


def environment(tmp_path: Path, migrated: bool = True) -> dict[str, str]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'trustplane.db'}"

    async def migrate() -> None:
        db = Database(url)
        await upgrade(db)
        await db.dispose()

    if migrated:
        run_sync(migrate())
    return {
        "TRUSTPLANE_DATABASE_URL": url,
        "TRUSTPLANE_DATA_DIR": str(tmp_path),
        "TRUSTPLANE_KEY_ENCRYPTION_KEY": KEK,
        "TRUSTPLANE_LOG_LEVEL": "warning",
    }


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return environment(tmp_path)


def cli(env: dict[str, str], *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(entities_app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.output


def test_add_and_list(env: dict[str, str]) -> None:
    added = json.loads(
        cli(
            env,
            "add",
            LEI,
            "--name",
            "Arranger Securities Europe S.A.",
            "--country",
            "lu",
            "--json",
        )
    )
    assert (added["lei"], added["country"], added["source"]) == (LEI, "LU", "operator")
    listed = json.loads(cli(env, "list", "--json"))
    assert listed["total"] == 1
    assert [e["legal_name"] for e in listed["entities"]] == ["Arranger Securities Europe S.A."]
    table = cli(env, "list")
    assert LEI in table
    assert "1 shown of 1 in the directory" in table


def test_import_reports_what_it_skipped(env: dict[str, str]) -> None:
    report = json.loads(cli(env, "import", str(SAMPLE), "--json"))
    assert (report["rows"], report["imported"], report["skipped"]) == (8, 4, 4)
    assert report["skipped_by_reason"]["invalid LEI"] == 1
    assert report["skipped_records"][0] == {
        "line": 7,
        "lei": "529900T8BM49AURSDO56",
        "reason": report["skipped_records"][0]["reason"],
    }
    text = cli(env, "import", str(SAMPLE))  # again: the same answer, nothing doubled
    assert "8 records read, 4 imported, 4 skipped" in text
    assert "line 9: 5299000J2N45DDNE4Y28: country: 'Germany'" in text
    assert json.loads(cli(env, "list", "--json"))["total"] == 4
    found = json.loads(cli(env, "list", "--search", "meridian", "--json"))["entities"]
    assert [e["lei"] for e in found] == ["529900T8BM49AURSDO55"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "5493001KJTIIGC8Y1R13", "--name", "X"], "not a valid ISO 17442 LEI"),
        (["add", LEI, "--name", "X", "--country", "Luxembourg"], "ISO 3166-1 alpha-2"),
        (["import", "/nonexistent/golden.csv"], "cannot be read"),
    ],
    ids=["bad-lei", "bad-country", "missing-file"],
)
def test_refusals_exit_1_with_one_line(env: dict[str, str], args: list[str], message: str) -> None:
    output = cli(env, *args, code=1)
    assert message in output
    assert "Traceback" not in output
    assert json.loads(cli(env, "list", "--json"))["total"] == 0


def test_a_missing_database_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    env = environment(tmp_path, migrated=False)
    before = sorted(tmp_path.rglob("*"))
    assert "there is no database at" in cli(env, "list", code=2)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_wrong_setting_exits_2(env: dict[str, str]) -> None:
    output = cli({**env, "TRUSTPLANE_PORT": "99999"}, "list", code=2)
    assert "port" in output.lower()
