"""``trustplane reference exceptions list|resolve`` on the services' store: the exception raised
by a lost entitlement is listed, escalated and resolved, each step a signed event naming the
operator; bad input exits non-zero with one line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from typer.testing import CliRunner

from tests.conftest import run_sync
from tests.reference.conftest import ORDER, Mandates, RecordingPdp, caller
from trustplane.cli import app
from trustplane.reference import machine
from trustplane.reference.serve import create_schemas, dispatcher_of, dispose, open_stores
from trustplane.reference.services import EntitlementLost, TradeServices
from trustplane.reference.settings import ReferenceSettings, ReferenceSettingsError


def environment(url: str, key: Path) -> dict[str, str]:
    return {
        "TRUSTPLANE_REFERENCE_DATABASE_URL": url,
        "TRUSTPLANE_REFERENCE_EVENT_KEY_FILE": str(key),
        "TRUSTPLANE_REFERENCE_ISSUER": "https://ref.example",
    }


async def an_exception(url: str, key: Path) -> str:
    """A trade through the four services (each store its own file, as the settings derive them
    from the URL) to a lost entitlement at settlement."""
    stores = open_stores(ReferenceSettings.from_env(environment(url, key)))
    await create_schemas(stores)
    pdp, mandates = RecordingPdp(), Mandates()
    s = TradeServices(stores, mandates, handoff=dispatcher_of(stores, machine.SERVICES))
    trade = await s.create_order(caller("alice", pdp), ORDER, "k")
    await s.execute(caller("b", pdp), trade.trade_id, "k")
    await s.propose_allocation(
        caller("alice", pdp), trade.trade_id, [{"account": "S", "quantity": "1000"}], "k"
    )
    await s.approve_allocation(caller("bob", pdp), trade.trade_id, "k")
    mandates.revoked.add("M-1")
    with pytest.raises(EntitlementLost) as lost:
        await s.submit_settlement(caller("c", pdp), trade.trade_id, {}, "k")
    await dispose(stores)
    return lost.value.exception.exception_id


def test_operators_list_and_resolve_exceptions(tmp_path: Path) -> None:
    url, key = f"sqlite+aiosqlite:///{tmp_path / 'ref.db'}", tmp_path / "events.pem"
    exception_id = run_sync(an_exception(url, key))
    env = {**environment(url, key), "COLUMNS": "200"}
    runner = CliRunner()
    listed = runner.invoke(app, ["reference", "exceptions", "list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert [e["exception_id"] for e in json.loads(listed.stdout)] == [exception_id]

    bad = runner.invoke(
        app, ["reference", "exceptions", "resolve", exception_id, "--action", "ignore"], env=env
    )
    assert bad.exit_code == 1
    assert "action must be reconsent, cancel or escalate" in bad.output
    escalated = runner.invoke(
        app,
        ["reference", "exceptions", "resolve", exception_id, "--action", "escalate", "--json"],
        env=env,
    )
    assert json.loads(escalated.stdout)["status"] == "escalated"
    cancelled = runner.invoke(
        app,
        ["reference", "exceptions", "resolve", exception_id, "--action", "cancel", "--note", "n"],
        env=env,
    )
    assert cancelled.exit_code == 0
    assert f"{exception_id}: resolved" in cancelled.stdout
    again = runner.invoke(
        app, ["reference", "exceptions", "resolve", exception_id, "--action", "cancel"], env=env
    )
    assert again.exit_code == 1
    assert "is resolved" in again.output
    status = runner.invoke(app, ["reference", "exceptions", "list", "--status", "x"], env=env)
    assert status.exit_code == 2

    async def last_events() -> tuple[list[dict[str, Any]], list[str]]:
        stores = open_stores(ReferenceSettings.from_env(environment(url, key)))
        events = await stores.settlement.events_after(0)
        learned = await stores.reporting.history(exception_id.split(".")[0])
        await dispose(stores)
        public = stores.settlement.signer.jwks()["keys"][0]
        found = [jwt.decode(e.jws, jwt.PyJWK(public).key, algorithms=["ES256"]) for e in events]
        return found, [r.transition for r in learned]

    claims, reporting = asyncio.run(last_events())
    assert [c["type"] for c in claims[-2:]] == ["exception.escalated", "exception.resolved"]
    assert claims[-1]["envelope"]["sub"].startswith("cli:")
    assert claims[-1]["envelope"]["policy_bundle_version"] == "cli"
    # the settlement's events (signed with its own key) were handed to the stores that learn them
    assert reporting[-2:] == ["exception#1", "cancel"]


def test_settings_refuse_what_cannot_work() -> None:
    assert ReferenceSettings.from_env({}).nats_url is None
    got = ReferenceSettings.from_env({"TRUSTPLANE_REFERENCE_NATS_URL": "nats://127.0.0.1:4222"})
    assert got.nats_url == "nats://127.0.0.1:4222"
    with pytest.raises(ReferenceSettingsError, match="NATS_URL"):
        ReferenceSettings.from_env({"TRUSTPLANE_REFERENCE_NATS_URL": "http://x"})
    with pytest.raises(ReferenceSettingsError, match="NATS_PREFIX"):
        ReferenceSettings.from_env({"TRUSTPLANE_REFERENCE_NATS_PREFIX": "a.b"})


def test_the_signal_receiver_needs_its_settings(tmp_path: Path) -> None:
    """``trustplane reference signals`` without a transmitter, or with a key that is not EC P-256,
    exits 2 with one line (the live receiver: tests/e2e/test_settlement_signals.py)."""
    runner = CliRunner()
    base = {
        "TRUSTPLANE_REFERENCE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'ref.db'}",
        "TRUSTPLANE_REFERENCE_EVENT_KEY_FILE": str(tmp_path / "events.pem"),
    }
    unset = runner.invoke(app, ["reference", "signals"], env=base)
    assert unset.exit_code == 2
    assert "SSF_CONFIGURATION_URL is not set" in unset.output
    not_ec = tmp_path / "client.pem"
    not_ec.write_text("not a key")
    env = {
        **base,
        "TRUSTPLANE_REFERENCE_SSF_CONFIGURATION_URL": "https://as.example/.well-known/ssf-configuration",
        "TRUSTPLANE_REFERENCE_SSF_CLIENT_ID": "c-signals",
        "TRUSTPLANE_REFERENCE_SSF_CLIENT_KEY_FILE": str(not_ec),
    }
    bad_key = runner.invoke(app, ["reference", "signals"], env=env)
    assert bad_key.exit_code == 2, bad_key.output
