"""Surveillance against a real ``trustplane serve``: a burst of tokens for one client raises one
``issuance.spike`` alert, an entry in the ledger (integrated, under a signed checkpoint) and a count
on the operations listener's ``/metrics``."""

from __future__ import annotations

import re
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from tests.conftest import run_sync
from tests.e2e.conftest import (
    DATABASES,
    PROPAGATION_TIMEOUT,
    LiveServer,
    LiveServers,
    client_credentials_token,
    register_client,
    wait_until,
)
from trustplane.storage.db import Database

pytestmark = pytest.mark.e2e
ALERT = "surveillance:alert:raised"
BURST = 12
FLOOR = 5


async def _alerts(url: str) -> list[dict[str, Any]]:
    db = Database(url)
    try:
        async with db.read() as conn:
            rows = await conn.execute(
                text("SELECT idx, entry FROM audit_leaves WHERE type = :t ORDER BY idx"),
                {"t": ALERT},
            )
            return [{"index": int(r[0]), **orjson.loads(r[1])} for r in rows.all()]
    finally:
        await db.dispose()


def alerts(server: LiveServer) -> list[dict[str, Any]]:
    return list(run_sync(_alerts(server.env["TRUSTPLANE_DATABASE_URL"])))


def spike_count(server: LiveServer) -> float:
    body = httpx.get(f"{server.ops_url}/metrics", timeout=10).text
    found = re.search(
        r'^trustplane_surveillance_alerts_total\{signal="issuance.spike"\} (\S+)$', body, re.M
    )
    return float(found.group(1)) if found else -1.0


@pytest.fixture(params=DATABASES)
def server(request: pytest.FixtureRequest, live_server: LiveServers) -> LiveServer:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return live_server.start(
        url,
        surveillance_interval="0.1",
        surveillance_issuance_floor=str(FLOOR),
        # a day's window (UTC days): the burst takes seconds, so it falls in one window
        surveillance_issuance_window="86400",
    )


def test_a_burst_of_tokens_raises_one_issuance_spike(server: LiveServer) -> None:
    assert spike_count(server) == 0  # the series exists before the first alert
    kit = register_client(server)
    for _ in range(BURST):
        client_credentials_token(server, kit)
    found = wait_until(
        lambda: alerts(server), PROPAGATION_TIMEOUT, "the issuance.spike alert in the ledger"
    )
    [alert] = [a for a in found if a["client_id"] == kit.client_id]
    assert alert["reason"] == "issuance.spike"
    assert alert["service"] == "trustplane.surveillance"
    assert alert["reason_ids"][:3] == [
        f"observed={FLOOR + 1}",
        f"threshold={FLOOR}",
        "window=86400s",
    ]
    first, crossing = map(int, alert["reason_ids"][3].removeprefix("sequence=").split(","))
    assert first < crossing < alert["index"]
    wait_until(lambda: spike_count(server) == 1, PROPAGATION_TIMEOUT, "the alert on /metrics")
    # the rest of the burst is the same window: no second alert
    client_credentials_token(server, kit)
    wait_until(
        lambda: len(alerts(server)) == 1 and _caught_up(server),
        PROPAGATION_TIMEOUT,
        "the detector to read the last token",
    )
    assert spike_count(server) == 1


def _caught_up(server: LiveServer) -> bool:
    async def check(url: str) -> bool:
        db = Database(url)
        try:
            async with db.read() as conn:
                position = (
                    await conn.execute(text("SELECT position FROM surveillance_cursor"))
                ).scalar()
                size = (await conn.execute(text("SELECT max(idx) + 1 FROM audit_leaves"))).scalar()
                pending = (await conn.execute(text("SELECT count(*) FROM audit_pending"))).scalar()
            return bool(pending == 0 and position == size)
        finally:
            await db.dispose()

    return bool(run_sync(check(server.env["TRUSTPLANE_DATABASE_URL"])))
