"""``GET /events`` on the authorization server: the one bearer guard (RFC 6750 codes), the cursor
(resumable, 400 for a bad one), the long poll, and every event verified independently (PyJWT)
against ``/jwks``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import LEI
from tests.protocol_server import Server
from tests.security_events.helpers import (
    alert,
    append_raw,
    drain,
    end_cursor,
    events_audience,
    events_token,
    get_events,
    subscriber,
    verify_with_pyjwt,
)
from trustplane.clients.model import ClientStatus
from trustplane.protocol.tokens import issue_access_token
from trustplane.security_events.stream import EVENT_TYP

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def jwks(server: Server) -> dict[str, Any]:
    response = await server.http.get("/jwks")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def error_of(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


# --------------------------------------------------------------------------- the guard


async def test_no_token_is_401_with_a_bare_challenge(server: Server) -> None:
    response = await get_events(server, None)
    assert error_of(response) == (401, "invalid_token")
    assert response.headers["www-authenticate"] == 'Bearer realm="trustplane"'


async def test_a_token_for_another_audience_is_401_invalid_token(server: Server) -> None:
    response = await get_events(server, await server.access_token())
    assert error_of(response) == (401, "invalid_token")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_a_token_without_the_scope_is_403_insufficient_scope(server: Server) -> None:
    token = issue_access_token(
        server.services.keys.ring,
        issuer=server.issuer,
        subject=server.kit.client_id,
        client_id=server.kit.client_id,
        audience=events_audience(server),
        scopes=("order:create",),
        lifetime=60,
        extra={"lei": LEI},
    ).token
    response = await get_events(server, token)
    assert error_of(response) == (403, "insufficient_scope")
    assert 'scope="event:subscribe"' in response.headers["www-authenticate"]


async def test_a_token_in_the_query_string_is_400(server: Server) -> None:
    token = await events_token(server)
    response = await server.http.get("/events", params={"access_token": token})
    assert error_of(response) == (400, "invalid_request")


async def test_a_revoked_token_is_401(server: Server) -> None:
    kit = await subscriber(server)
    token = await events_token(server, kit)
    assert (await get_events(server, token)).status_code == 200
    # the subscriber revokes its own token (RFC 7009): the next read is refused
    revoked = await server.http.post("/revoke", data={"token": token, **kit.auth()})
    assert revoked.status_code == 200
    assert error_of(await get_events(server, token)) == (401, "invalid_token")


# --------------------------------------------------------------------------- the cursor


@pytest.mark.parametrize(
    "params",
    [
        {"after": "abc"},
        {"after": "-1"},
        {"after": "1e3"},
        {"after": "1" * 19},
        {"after": "999999999999"},  # beyond the ledger
        {"wait": "x"},
        {"wait": "31"},
        {"wait": "nan"},
        {"wait": "-1"},
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "1.5"},
        {"cursor": "0"},  # unknown parameter
    ],
    ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()),
)
async def test_a_bad_parameter_is_400_invalid_request(
    server: Server, params: dict[str, str]
) -> None:
    response = await get_events(server, await events_token(server), **params)
    assert error_of(response) == (400, "invalid_request")
    assert response.headers["cache-control"] == "no-store"


async def test_events_resume_from_a_cursor_and_verify_independently(server: Server) -> None:
    token = await events_token(server)
    cursor = await end_cursor(server, token)

    kit = await _register(server)  # oauth:client:registered
    await server.services.clients.set_status(kit.client_id, ClientStatus.DISABLED)
    await server.services.keys.rotate(reason="test")  # keys:key:created, activated, retired
    await server.http.get("/jwks")
    await server.services.ledger.integrate_all()

    found, end = await drain(server, token, cursor)
    types = [e["type"] for e in found]
    assert "oauth:client:registered" in types
    assert "oauth:client:disabled" in types
    assert "keys:key:activated" in types
    assert "oauth:token:issued" not in types  # not a security event
    published = await jwks(server)
    seqs = []
    for event in found:
        claims = verify_with_pyjwt(event["jws"], published, server.issuer)
        assert claims["jti"] == event["id"]
        assert claims["seq"] == event["seq"]
        assert claims["type"] == event["type"]
        assert claims["ledger"]["index"] == event["seq"] >= int(cursor)
        seqs.append(event["seq"])
    assert seqs == sorted(set(seqs))
    disabled = next(e for e in found if e["type"] == "oauth:client:disabled")
    claims = verify_with_pyjwt(disabled["jws"], published, server.issuer)
    assert claims["envelope"]["client_id"] == kit.client_id
    activated = next(e for e in found if e["type"] == "keys:key:activated")
    assert verify_with_pyjwt(activated["jws"], published, server.issuer)["data"]["kid"]

    # the same cursor again: the same events; one at a time: the same sequence; the end: nothing
    again, _ = await drain(server, token, cursor)
    assert [e["id"] for e in again] == [e["id"] for e in found]
    one_by_one, after = [], cursor
    while True:
        body = (await get_events(server, token, after=after, limit=1)).json()
        one_by_one += body["events"]
        after = body["next"]
        if not body["events"] and not body["more"]:
            break
    assert [e["id"] for e in one_by_one] == [e["id"] for e in found]
    assert (await drain(server, token, end)) == ([], end)


async def test_a_surveillance_alert_carries_the_transaction_envelope(server: Server) -> None:
    token = await events_token(server)
    cursor = await end_cursor(server, token)
    await append_raw(
        server.services.db,
        alert(
            server.issuer,
            subject="trader-7",
            client_id="desk-app",
            actor_chain=["agent-1", "desk-app"],
            mandate_id="M-42",
            mandate_version=3,
            transaction_id="txn-123",
            authorization_details_digest="sha256-abc",
            reason_ids=["wash-trade", "decision:d-77"],
            policy_bundle_version="bundle-9",
            payload={"trader_name": "A. Person"},
        ),
    )
    await server.services.ledger.integrate_all()
    [event], _ = await drain(server, token, cursor)
    assert event["type"] == "surveillance:alert:raised"
    claims = verify_with_pyjwt(event["jws"], await jwks(server), server.issuer)
    assert claims["envelope"] == {
        "txn": "txn-123",
        "sub": "trader-7",
        "client_id": "desk-app",
        "act": [{"sub": "agent-1"}, {"sub": "desk-app"}],
        "mandate": {"id": "M-42", "version": 3},
        "authorization_details_digest": "sha256-abc",
        "decision_ids": ["d-77"],
        "policy_bundle_version": "bundle-9",
    }
    assert claims["data"]["reason_ids"] == ["wash-trade", "decision:d-77"]
    assert "A. Person" not in str(claims)  # the personal payload stays in the ledger
    assert claims["ledger"]["payload_hash"]


async def test_the_long_poll_wakes_on_a_new_event(server: Server) -> None:
    token = await events_token(server)
    cursor = await end_cursor(server, token)
    empty = (await get_events(server, token, after=cursor)).json()
    assert empty == {"events": [], "next": cursor, "more": False}
    waiting = asyncio.create_task(get_events(server, token, after=cursor, wait=25))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await _register(server)
    await server.services.ledger.integrate_all()
    response = await waiting
    assert response.status_code == 200
    [event] = response.json()["events"]
    assert event["type"] == "oauth:client:registered"


async def test_the_header_names_the_event_type_not_a_set(server: Server) -> None:
    import jwt

    token = await events_token(server)
    found, _ = await drain(server, token)
    header = jwt.get_unverified_header(found[0]["jws"])
    assert header["typ"] == EVENT_TYP != "secevent+jwt"
    assert header["kid"] in {k["kid"] for k in (await jwks(server))["keys"]}


async def _register(server: Server) -> Any:
    from tests.conftest import register_kit

    return await register_kit(server.services)
