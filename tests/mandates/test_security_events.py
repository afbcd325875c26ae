"""Security events (RFC 8417 SETs, OpenID CAEP shapes): signed with the authorization server's key,
stored in the outbox with the change, published to a real NATS JetStream when configured."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from sqlalchemy import select

from tests.conftest import require_service
from tests.mandates.conftest import GRANTOR, grantee, terms
from trustplane.app import Services
from trustplane.mandates.events import SESSION_REVOKED, TOKEN_CLAIMS_CHANGE
from trustplane.mandates.tables import security_events
from trustplane.settings import Settings

NATS_URL = "nats://127.0.0.1:4222"


async def outbox(services: Services) -> list[Any]:
    async with services.db.read() as conn:
        return list(await conn.execute(select(security_events).order_by(security_events.c.seq)))


def decode(
    services: Services, token: str, audience: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify with PyJWT against the public key published in our JWKS."""
    header = jwt.get_unverified_header(token)
    jwks = json.loads(services.keys.ring.jwks_json)
    key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == header["kid"]))
    options = {"require": ["iss", "iat", "jti"], "verify_aud": audience is not None}
    claims = jwt.decode(
        token, key, algorithms=[header["alg"]], audience=audience, issuer=services.settings.issuer,
        options=options,  # type: ignore[arg-type]
    )  # fmt: skip
    return header, claims


async def test_revocation_emits_a_signed_session_revoked_set(
    services: Services, client_id: str
) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    assert await outbox(services) == []  # creating a mandate affects no live token

    await services.mandates.revoke(m.id, actor="alice", reason="withdrawn by the grantor")

    [row] = await outbox(services)
    header, claims = decode(services, row.token)
    assert header["typ"] == "secevent+jwt"
    assert header["kid"] == services.keys.ring.require_signer().kid
    assert (row.event_type, row.mandate_id, row.mandate_version, row.jti) == (
        SESSION_REVOKED, m.id, 1, claims["jti"],
    )  # fmt: skip
    assert row.published_at is None  # no NATS configured: stays in the outbox
    assert set(claims) == {"iss", "iat", "jti", "sub_id", "mandate", "events"}
    assert claims["mandate"] == {"id": m.id, "version": 1}
    assert claims["sub_id"] == {
        "format": "complex",
        "session": {"format": "opaque", "id": m.id},
        "application": {"format": "opaque", "id": client_id},
        "tenant": {"format": "opaque", "id": GRANTOR},
        "user": {"format": "opaque", "id": "alice"},
    }
    assert list(claims["events"]) == [SESSION_REVOKED]
    event = claims["events"][SESSION_REVOKED]
    assert event["initiating_entity"] == "admin"
    assert event["reason_admin"] == {"en": "withdrawn by the grantor"}
    assert abs(event["event_timestamp"] - claims["iat"]) <= 1


async def test_suspend_resume_and_amend_emit_token_claims_change(
    services: Services, client_id: str
) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    await services.mandates.suspend(m.id, actor="ops")
    await services.mandates.resume(m.id, actor="ops")
    await services.mandates.amend(m.id, actor="ops", changes={"scopes": ["order:cancel"]})

    rows = await outbox(services)
    assert [(r.event_type, r.mandate_version) for r in rows] == [
        (TOKEN_CLAIMS_CHANGE, 1),
        (TOKEN_CLAIMS_CHANGE, 1),
        (TOKEN_CLAIMS_CHANGE, 1),  # about the superseded version's tokens
    ]
    changed = [decode(services, r.token)[1]["events"][TOKEN_CLAIMS_CHANGE]["claims"] for r in rows]
    assert changed == [
        {"mandate_status": "suspended"},
        {"mandate_status": "active"},
        {"mandate_version": 2, "mandate_status": "superseded"},
    ]
    assert "reason_admin" not in decode(services, rows[0].token)[1]["events"][TOKEN_CLAIMS_CHANGE]


async def test_configured_audience(settings_factory: Callable[..., Settings]) -> None:
    svc = Services.build(settings_factory(security_event_audience=("https://siem.example",)))
    await svc.start()
    try:
        client_id = (await grantee(svc)).client_id
        m = await svc.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
        await svc.mandates.revoke(m.id, actor="ops")
        [row] = await outbox(svc)
        assert (
            decode(svc, row.token, audience="https://siem.example")[1]["aud"]
            == "https://siem.example"
        )
    finally:
        await svc.stop()


# --------------------------------------------------------------------------- NATS JetStream


@pytest.fixture
async def nats_services(settings_factory: Callable[..., Settings]) -> AsyncIterator[Services]:
    require_service("NATS", "127.0.0.1", 4222)
    tag = secrets.token_hex(4)
    svc = Services.build(
        settings_factory(
            nats_url=NATS_URL, nats_stream=f"TP_TEST_{tag}", nats_subject=f"tp_test_{tag}.secevents"
        )
    )
    await svc.start()
    yield svc
    await svc.stop()
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().delete_stream(f"TP_TEST_{tag}")
    finally:
        await nc.close()


async def test_published_to_jetstream_and_received_by_a_subscriber(nats_services: Services) -> None:
    import nats

    svc = nats_services
    client_id = (await grantee(svc)).client_id
    m = await svc.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    await svc.mandates.suspend(m.id, actor="ops")  # first publication creates the stream

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(f"{svc.settings.nats_subject}.>", deliver_policy="all")
        await svc.mandates.revoke(m.id, actor="alice", reason="withdrawn")
        received = [await sub.next_msg(timeout=5) for _ in range(2)]
        await sub.unsubscribe()
    finally:
        await nc.close()

    rows = await outbox(svc)
    assert [r.published_at is not None for r in rows] == [True, True]
    assert [m.subject for m in received] == [
        f"{svc.settings.nats_subject}.token-claims-change",
        f"{svc.settings.nats_subject}.session-revoked",
    ]
    assert [m.data.decode() for m in received] == [r.token for r in rows]
    assert [m.headers["Nats-Msg-Id"] for m in received] == [r.jti for r in rows]  # type: ignore[index]
    _, claims = decode(svc, received[1].data.decode())
    assert list(claims["events"]) == [SESSION_REVOKED]


async def test_nats_down_keeps_the_event_in_the_outbox(
    settings_factory: Callable[..., Settings],
) -> None:
    from tests.conftest import free_port

    svc = Services.build(settings_factory(nats_url=f"nats://127.0.0.1:{free_port()}"))
    await svc.start()
    try:
        client_id = (await grantee(svc)).client_id
        m = await svc.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
        revoked = await asyncio.wait_for(svc.mandates.revoke(m.id, actor="ops"), timeout=30)
        assert revoked.status.value == "revoked"  # the change itself is never held up
        [row] = await outbox(svc)
        assert row.published_at is None
        assert await svc.mandates.publish_events() == 0  # retried later by maintenance
    finally:
        await svc.stop()
