"""``trustplane demo`` as a new user runs it, in a subprocess: three real ``trustplane serve``
deployments (arranger, broker, clearing) and two ``trustplane reference serve`` processes on
loopback, the whole reference lifecycle (BRIEF.md steps 1-6, step 5's exception included), the chain
of authority, each ledger exported and verified offline. The test reads the ``--json`` summary:
each step's outcome, then that every process it started is gone (its ports free, no process left
working in its directory)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.e2e
TRUSTPLANE = shutil.which("trustplane") or str(Path(sys.executable).with_name("trustplane"))


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRUSTPLANE, "demo", *args], capture_output=True, text=True, timeout=300, check=False,
        env=env,
    )  # fmt: skip


def labels(node: dict[str, Any]) -> Iterator[tuple[str, str]]:
    yield node["kind"], node["label"]
    for child in node["children"]:
        yield from labels(child)


def branch(tree: dict[str, Any], kind: str, starts: str) -> dict[str, Any]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if node["kind"] == kind and node["label"].startswith(starts):
            return node
        stack.extend(node["children"])
    raise AssertionError(f"no {kind} node {starts!r}")


def port_free(port: int) -> bool:
    """Nobody listens on ``port``: a connection is refused and a listener can bind it again
    (SO_REUSEADDR: the connections the stopped server closed may linger in TIME_WAIT)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        pass
    else:
        return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is inside ``directory`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = (entry / "cwd").resolve(strict=True)
            except OSError:
                continue
            if cwd.is_relative_to(directory):
                found.append(int(entry.name))
    return found


# serial: its five ports must be free after the stop, and another worker's servers and client
# connections take ephemeral ports of their own (tests/parallel.py)
@pytest.mark.serial
def test_the_demo_runs_the_lifecycle_and_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = demo("--json", "--workdir", str(workdir))
    assert proc.stdout, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"], (summary.get("error"), summary.get("logs"))
    assert proc.returncode == 0
    assert [s["step"] for s in summary["steps"]] == ["0", "0", "1", "2", "3", "4", "5", "6", "7"]
    assert all(s["ok"] for s in summary["steps"])
    assert set(summary["deployments"]) == {"arranger", "broker", "clearing"}

    # steps 1-4: one trade settled under the mandate, in the transaction of the exchanges
    mandate, txn = summary["mandate"], summary["txn"]
    assert mandate["version"] == 1
    assert summary["trade"] == {**summary["trade"], "state": "settled", "txn": txn}
    # the partner profiles' default binding: the clearing's token, exchanged from the arranger's,
    # is DPoP-bound (cnf.jkt) and settles with proofs (it was a bearer token, token_binding bearer)
    assert summary["clearing_token_binding"] == ["jkt"]

    # step 5: the mandate revoked between execution and settlement
    exception = summary["exception"]
    assert (exception["status"], exception["code"]) == (403, "settlement-exception")
    assert exception["reason"] == "mandate_not_usable"
    assert exception["txn"] != txn
    assert exception["ssf_seconds"] < 10
    deny = exception["deny"]
    assert deny["action"] == "trade:submit_settlement"
    assert deny["reason_ids"] == ["trade.mandate_live"]
    assert deny["decision_id"] == exception["decision_id"]
    assert deny["proved"]
    assert (exception["resolved_status"], exception["state"]) == ("resolved", "cancelled")

    # the reference services' events: signed, verified; on NATS when it was reachable
    events = summary["events"]
    assert events["verified"] == events["count"] >= 12
    assert {"order.created", "trade.executed", "settlement.settled", "settlement.exception"} <= set(
        events["types"]
    )
    if summary["nats"]:
        assert events["published_to_nats"] == events["count"]

    # step 6: the chain of authority of the first transaction
    tree = summary["tree"]
    assert tree["label"] == f"transaction {txn}"
    person = branch(tree, "person", "Alice Trader")
    assert branch(person, "mandate", f"mandate {mandate['id']} v1")
    arranger = branch(tree, "deployment", "arranger")
    assert any(k == "exchange" and "act arranger order service" in t for k, t in labels(arranger))
    broker = branch(tree, "deployment", "broker")
    found = set(labels(broker))
    assert any(k == "exchange" and "broker execution service" in t for k, t in found)
    assert any(k == "decision" and "allow trade:create" in t for k, t in found)
    clearing = branch(tree, "deployment", "clearing")
    assert any("allow trade:submit_settlement" in t for _, t in labels(clearing))
    trade_events = [t for k, t in labels(branch(tree, "events", "reference")) if k == "event"]
    assert trade_events[0].startswith("order.created")
    assert trade_events[-1].startswith("settlement.settled")

    # step 7: each ledger exported and verified offline
    assert set(summary["ledgers"]) == {"arranger", "broker", "clearing"}
    for name, ledger in summary["ledgers"].items():
        assert ledger["ok"], name
        assert not ledger["failures"], name
        assert ledger["entries"] > 0
        assert Path(ledger["export"]).exists()

    # nothing left running
    assert summary["stopped"]["all_exited"]
    assert summary["stopped"]["processes"] == 8  # 3 servers, their operators, 2 services
    assert len(summary["ports"]) == 5
    assert all(port_free(port) for port in summary["ports"]), summary["ports"]
    assert processes_in(workdir.resolve()) == []


def test_the_demo_refuses_a_work_directory_in_use(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("mine")
    proc = demo("--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr
    assert (tmp_path / "something").read_text() == "mine"


def test_the_demo_with_nats_on_fails_when_nats_is_unreachable(tmp_path: Path) -> None:
    env = {**os.environ, "NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    proc = demo("--json", "--nats", "on", "--workdir", str(tmp_path / "d"), env=env)
    assert proc.returncode == 1
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False
    assert "NATS is not reachable" in summary["error"]
    assert summary["stopped"]["processes"] == 0
