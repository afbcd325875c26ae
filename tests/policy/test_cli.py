"""``trustplane policy``: the bundle lifecycle and simulation from the command line (SQLite)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from tests.conftest import KEK, run_sync
from tests.policy.conftest import REPO_POLICIES
from tests.policy.test_simulate import candidate
from trustplane.authzen.model import DecisionRequest
from trustplane.cli import app
from trustplane.policy.bundle import BundleSource, default_bundle
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The policy CLI configures structlog for its process; put the test session's back."""
    config = structlog.get_config()
    yield
    structlog.configure(**config)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    url = f"sqlite+aiosqlite:///{tmp_path / 'tp.db'}"

    async def migrate() -> None:
        db = Database(url)
        await upgrade(db)
        await db.dispose()

    run_sync(migrate())
    monkeypatch.setenv("TRUSTPLANE_DATABASE_URL", url)
    monkeypatch.setenv("TRUSTPLANE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TRUSTPLANE_KEY_ENCRYPTION_KEY", KEK)
    monkeypatch.setenv("TRUSTPLANE_LOG_LEVEL", "warning")
    return tmp_path


def write(source: BundleSource, root: Path) -> Path:
    for name, text in source.files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["policy", *args])
    return result.exit_code, result.output


def test_validate_and_test_the_default_bundle() -> None:
    code, output = cli("validate", str(REPO_POLICIES))
    assert code == 0, output
    assert default_bundle().version in output
    code, output = cli("test", str(REPO_POLICIES), "--json")
    assert code == 0, output
    data = json.loads(output)
    assert data["ok"] is True
    assert all(c["passed"] for c in data["cases"])


def test_validate_refuses_a_bundle_that_does_not_type_check(tmp_path: Path) -> None:
    root = write(default_bundle(), tmp_path / "b")
    (root / "bad.cedar").write_text(
        '@id("bad")\npermit (principal, action == Action::"order:create", resource) '
        'when { context.amount_minor like "x*" };\n'
    )
    code, output = cli("validate", str(root), "--json")
    assert code == 1
    problems = json.loads(output)["problems"]
    assert problems
    assert all(p.startswith("bad.cedar: bad:") for p in problems)
    code, output = cli("publish", str(root), "--change-ref", "CR-1", "--author", "a")
    assert code == 1
    assert "publish refused" in output


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    code, output = cli("validate", str(tmp_path / "missing"))
    assert code == 2
    assert "not a directory" in output


def test_lifecycle_publish_activate_list_diff_rollback(env: Path) -> None:
    root = write(default_bundle(), env / "default")
    code, output = cli(
        "publish", str(root), "--change-ref", "CR-1", "--author", "alice", "--activate", "--json"
    )
    assert code == 0, output
    first = json.loads(output)
    assert first["created"] is True
    assert first["activated"] is True

    cand = write(candidate(), env / "cand")
    code, output = cli("publish", str(cand), "--change-ref", "CR-2", "--author", "bob", "--json")
    assert code == 0, output
    second = json.loads(output)["version"]

    code, output = cli("diff", str(root), second[:12], "--json")
    assert code == 0, output
    diff = json.loads(output)
    assert diff["files"] == {
        "added": ["reports.cedar"],
        "removed": [],
        "changed": ["tests/default.yaml", "trading.cedar"],
    }
    assert diff["policies"] == {
        "added": ["report.view_anywhere"],
        "removed": [],
        "changed": ["order.large_ticket_approval", "residency.region_served"],
    }

    code, output = cli("activate", second[:12], "--actor", "bob", "--change-ref", "CR-2")
    assert code == 0, output
    assert f"active {second}" in output
    code, output = cli("activate", second[:12])
    assert code == 1
    assert "already active" in output

    code, output = cli("list", "--json")
    data = json.loads(output)
    assert [b["status"] for b in data["bundles"]] == ["active", "retired"]
    assert [a["action"] for a in data["activations"]] == ["activate", "activate"]

    code, output = cli("rollback", "--actor", "carol", "--json")
    assert code == 0, output
    assert json.loads(output)["version"] == first["version"]
    code, output = cli("list")
    assert code == 0
    assert "CR-2" in output
    assert "rollback" in output


def test_simulate_gates_on_the_threshold(env: Path) -> None:
    from tests.policy.conftest import client, order, trade
    from trustplane.app import Services
    from trustplane.settings import load_settings

    async def record() -> None:
        svc = Services.build(load_settings())
        await svc.start()
        try:
            await svc.policy.engine.decide_many(
                [
                    DecisionRequest(
                        client(), "order:create", order(), trade(amount_minor=700_000_000)
                    ),
                    DecisionRequest(client(), "order:create", order("o2"), trade(amount_minor=100)),
                ]
            )
        finally:
            await svc.stop()

    run_sync(record())
    cand = write(candidate(), env / "cand")
    code, output = cli("simulate", "--bundle", str(cand), "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["flips"] == {"allow_to_deny": 1, "deny_to_allow": 0}
    assert report["by_reason"]["allow_to_deny"] == {"order.large_ticket_approval": 1}
    assert report["exceeded"] is False

    code, output = cli("simulate", "--bundle", str(cand), "--max-flips", "0")
    assert code == 1
    assert "allow -> deny" in output
    assert "exceed the threshold" in output
    code, output = cli("simulate", "--bundle", str(cand), "--max-flip-rate", "0.5")
    assert code == 0, output
    code, output = cli("simulate", "--bundle", str(cand), "--since", "1h", "--json")
    assert json.loads(output)["total"] == 2
    code, output = cli(
        "simulate", "--bundle", str(cand), "--since", "2099-01-01T00:00:00Z", "--json"
    )
    assert json.loads(output)["total"] == 0
    code, output = cli("simulate", "--bundle", str(cand), "--since", "yesterday")
    assert code == 2

    shutil.rmtree(cand / "tests")
    code, output = cli("simulate", "--bundle", str(cand))
    assert code == 1
    assert "no test cases" in output
