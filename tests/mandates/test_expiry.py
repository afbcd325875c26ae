"""The expiry event: announced once per expiry (also with two processes racing), re-armed by an
amendment of the dates, never for a revoked mandate."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from tests.mandates.conftest import terms
from tests.mandates.test_security_events import decode
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.mandates.events import TOKEN_CLAIMS_CHANGE
from trustplane.mandates.model import MandateAction, MandateStatus
from trustplane.mandates.tables import security_events


async def sets(services: Services) -> list[str]:
    async with services.db.read() as conn:
        return list(
            (
                await conn.execute(select(security_events.c.token).order_by(security_events.c.seq))
            ).scalars()
        )


async def test_expiry_is_announced_once(services: Services, client_id: str) -> None:
    now = int(time.time())
    m = await services.mandates.create(
        terms(client_id, effective_until=now + 60), actor="a", accepted_by="alice"
    )
    assert await services.mandates.notify_expired(now + 59) == 0

    assert await services.mandates.notify_expired(now + 61) == 1
    assert await services.mandates.notify_expired(now + 120) == 0

    last = (await services.mandates.history(m.id)).changes[-1]
    assert (last.action, last.status, last.actor, last.version) == (
        MandateAction.EXPIRED,
        MandateStatus.EXPIRED,
        "system:clock",
        1,
    )
    [token] = await sets(services)
    event = decode(services, token)[1]["events"][TOKEN_CLAIMS_CHANGE]
    assert (event["claims"], event["initiating_entity"]) == (
        {"mandate_status": "expired"},
        "system",
    )
    audit = [e for e in await recent_events(services.db) if e["type"] == "mandates:mandate:expired"]
    assert [(e["mandate_id"], e["mandate_version"]) for e in audit] == [(m.id, 1)]


async def test_amending_the_dates_rearms_it(services: Services, client_id: str) -> None:
    now = int(time.time())
    m = await services.mandates.create(
        terms(client_id, effective_until=now + 60), actor="a", accepted_by="alice"
    )
    assert await services.mandates.notify_expired(now + 61) == 1
    await services.mandates.amend(m.id, actor="a", changes={"effective_until": now + 3600})
    assert await services.mandates.notify_expired(now + 120) == 0
    assert await services.mandates.notify_expired(now + 3601) == 1
    actions = [c.action for c in (await services.mandates.history(m.id)).changes]
    assert actions == ["created", "expired", "amended", "expired"]


async def test_revoked_mandates_are_not_announced(services: Services, client_id: str) -> None:
    now = int(time.time())
    m = await services.mandates.create(
        terms(client_id, effective_until=now + 60), actor="a", accepted_by="alice"
    )
    await services.mandates.revoke(m.id, actor="a")
    assert await services.mandates.notify_expired(now + 61) == 0


async def test_two_processes_announce_it_once(services: Services, client_id: str) -> None:
    other = Services.build(services.settings)
    await other.start()
    try:
        now = int(time.time())
        m = await services.mandates.create(
            terms(client_id, effective_until=now + 60), actor="a", accepted_by="alice"
        )
        counts = await asyncio.gather(
            services.mandates.notify_expired(now + 61), other.mandates.notify_expired(now + 61)
        )
        assert sorted(counts) == [0, 1]
        actions = [c.action for c in (await services.mandates.history(m.id)).changes]
        assert actions.count(MandateAction.EXPIRED) == 1
    finally:
        await other.stop()
