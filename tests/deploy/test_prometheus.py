"""``deploy/``: the Prometheus rules pass ``promtool check rules`` and their unit tests (``promtool test
rules`` with synthetic series), and every metric the rules and the Grafana dashboard name exists in
trustplane's registry, so renaming a metric fails here instead of silencing an alert."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import trustplane.app
import trustplane.expiry
import trustplane.pep
import trustplane.pep.idempotency
from tests.conftest import IN_CI

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "trustplane-rules.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "trustplane.json"
METRIC = re.compile(r"\btrustplane_[a-z0-9_]+")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
}
# the modules are imported for the metrics they register
_ = (trustplane.app, trustplane.expiry, trustplane.pep, trustplane.pep.idempotency)


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            pytest.fail("promtool is missing (.ci/run installs Debian's prometheus package)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_rules_pass_promtool_check() -> None:
    done = _run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    assert RULE_TESTS
    done = _run("test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for g in _rules()["groups"] for r in g["rules"] if "alert" in r}
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert alerts - tested == set()


def test_every_alert_has_a_severity_and_a_summary() -> None:
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule
                assert rule["annotations"]["summary"], rule


def _rules() -> Any:
    return yaml.safe_load(RULES.read_text())


def _registered() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_metric_in_the_rules_exists() -> None:
    used = set(METRIC.findall(RULES.read_text()))
    assert used
    assert used - _registered() == set()


def test_every_metric_in_the_dashboard_exists() -> None:
    used = {name for expr in _dashboard_exprs() for name in METRIC.findall(expr)}
    assert len(used) > 20
    assert used - _registered() == set()


def test_a_renamed_metric_would_be_caught() -> None:
    assert "trustplane_tokens_issued_total" in _registered()
    assert "trustplane_tokens_issued_count" not in _registered()  # a counter has no _count
    assert "trustplane_token_exchange_actor_chain_depth_bucket" in _registered()


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "trustplane"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert {t["refId"] for t in panel["targets"]} == {
            chr(65 + i) for i in range(len(panel["targets"]))
        }
    assert "datasource" in variables


def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool has no query checker: every expression goes through a recording rule instead."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query{i}",
                        "expr": expr.replace("$__rate_interval", "5m"),
                    }
                    for i, expr in enumerate(_dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = _run("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
