"""Migration ``0002_ledger``: the interim ``audit_events`` rows become pending ledger entries, in
order, and are integrated on first start; the downgrade copies the entries back."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from tests.audit.test_ledger import checkpoint_of
from tests.conftest import PG_ADMIN_URL, make_settings, require_service
from tests.storage.test_migrations import _admin
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def blank_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'blank.db'}"
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"tp_migrate_{secrets.token_hex(4)}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def interim_body(n: int) -> str:
    return orjson.dumps(
        {
            "type": "oauth:token:issued",
            "issuer": "http://127.0.0.1:8000",
            "subject": f"c{n}",
            "client_id": f"c{n}",
            "actor_chain": [],
            "partner": None,
            "audience": "https://execution.example/api",
            "scopes": ["order:create"],
            "authorization_details_digest": None,
            "mandate_id": None,
            "mandate_version": None,
            "transaction_id": None,
            "correlation_id": None,
            "jti": f"jti-{n}",
            "decision": "allow",
            "reason": None,
            "reason_ids": [],
            "policy_bundle_version": None,
            "service": "trustplane.oauth",
            "region": None,
            "payload": {"grant_type": "client_credentials", "n": n},
            "time": 1_790_000_000_000 + n,
            "event_id": f"{n:032x}",
        }
    ).decode()


async def test_interim_rows_are_carried_into_the_ledger(blank_url: str, tmp_path: Path) -> None:
    db = Database(blank_url)
    await upgrade(db, "0001")
    async with db.transaction() as conn:
        for n in range(5):
            await conn.execute(
                text(
                    "INSERT INTO audit_events (event_id, type, time_ms, client_id, subject, jti, "
                    "transaction_id, body) VALUES (:e, 'oauth:token:issued', :t, :c, :c, :j, NULL, :b)"
                ),
                {
                    "e": f"{n:032x}",
                    "t": 1_790_000_000_000 + n,
                    "c": f"c{n}",
                    "j": f"jti-{n}",
                    "b": interim_body(n),
                },
            )
    await upgrade(db)
    await db.dispose()

    svc = Services.build(make_settings(blank_url, tmp_path))
    await svc.start()
    try:
        assert (await checkpoint_of(svc.ledger)).size >= 5
        carried = [
            e for e in await recent_events(svc.db, limit=100) if (e["jti"] or "").startswith("jti-")
        ]
        assert [e["jti"] for e in reversed(carried)] == [f"jti-{n}" for n in range(5)]
        assert carried[0]["payload"] == {"grant_type": "client_credentials", "n": 4}
    finally:
        await svc.stop()
