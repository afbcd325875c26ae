"""Shared by the security-event tests: a subscriber's token, reading the stream, writing ledger
entries of any type (a surveillance alert is a plain audit event of type ``surveillance:alert:raised``),
and the independent verification of an event with PyJWT."""

from __future__ import annotations

from typing import Any

import httpx
import jwt
from sqlalchemy import func, select

from tests.conftest import EXECUTION, ClientKit, register_kit
from tests.protocol_server import Server
from trustplane.audit import store as audit_store
from trustplane.audit.canonical import dict_entry_parts
from trustplane.audit.tables import audit_leaves
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.security_events.stream import EVENT_TYP, SECURITY_TYPES
from trustplane.storage.db import Database


def events_audience(server: Server) -> str:
    return server.issuer + "/events"


async def subscriber(server: Server) -> ClientKit:
    return await register_kit(
        server.services,
        scope="event:subscribe order:create",
        allowed_resources=[events_audience(server), EXECUTION],
    )


async def events_token(server: Server, kit: ClientKit | None = None) -> str:
    kit = kit or await subscriber(server)
    return await server.access_token(kit, scope="event:subscribe", resource=events_audience(server))


async def get_events(server: Server, token: str | None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await server.http.get("/events", params=params, headers=headers)


async def drain(server: Server, token: str, after: str = "0") -> tuple[list[dict[str, Any]], str]:
    """Every event from ``after`` on, page by page; and the cursor after the last."""
    found: list[dict[str, Any]] = []
    while True:
        response = await get_events(server, token, after=after, limit=500)
        assert response.status_code == 200, response.text
        body = response.json()
        found += body["events"]
        after = body["next"]
        if not body["events"] and not body["more"]:
            return found, after


async def end_cursor(server: Server, token: str) -> str:
    """The cursor past every event committed so far (integrated first: nothing left pending)."""
    await server.services.ledger.integrate_all()
    return (await drain(server, token))[1]


async def append_raw(db: Database, *bodies: dict[str, Any]) -> None:
    """Ledger entries from dicts (any ``type``), in one transaction, as the audit sink writes them."""
    rows = []
    for body in bodies:
        entry, payload, salt = dict_entry_parts(body)
        rows.append((entry.decode(), payload.decode(), salt))
    async with db.transaction() as conn:
        await audit_store.append_pending(conn, rows)


def alert(issuer: str, **fields: Any) -> dict[str, Any]:
    base = AuditEvent(type=AuditEventType.TOKEN_REVOKED, issuer=issuer).to_dict()
    return {
        **base,
        "type": "surveillance:alert:raised",
        "service": "trustplane.surveillance",
        **fields,
    }


async def security_event_ids(db: Database) -> list[str]:
    """The event ids of every integrated security event, in ledger order."""
    async with db.read() as conn:
        query = (
            select(audit_leaves.c.event_id)
            .where(audit_leaves.c.type.in_(sorted(SECURITY_TYPES)))
            .order_by(audit_leaves.c.idx)
        )
        return [str(r[0]) for r in (await conn.execute(query)).all()]


async def ledger_size(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(audit_leaves))).scalar())


def verify_with_pyjwt(token: str | bytes, jwks: dict[str, Any], issuer: str) -> dict[str, Any]:
    """The independent check: PyJWT, the key chosen by ``kid`` from the published JWKS, under the
    algorithm that key is published for; ``typ`` must be ``security-event+jwt``."""
    header = jwt.get_unverified_header(token)
    if header.get("typ") != EVENT_TYP:
        raise jwt.InvalidTokenError(f"typ {header.get('typ')!r}")
    published = [k for k in jwks["keys"] if k.get("kid") == header.get("kid")]
    if len(published) != 1:
        raise jwt.InvalidTokenError("unknown kid")
    key = jwt.PyJWK(published[0])
    claims: dict[str, Any] = jwt.decode(
        token,
        key=key.key,
        algorithms=[published[0]["alg"]],
        issuer=issuer,
        options={"require": ["iss", "jti", "iat"], "verify_aud": False},
    )
    return claims
