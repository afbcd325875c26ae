"""The token endpoint's audit trail: every issuance is one ``oauth:token:issued`` event carrying the
token's jti, client, audience and scopes; every refusal is one ``oauth:token:refused`` event whose
``reason`` is the wire error code. Events are durable before the response, so they are read at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import jwt
import orjson
import pytest

from tests.conftest import EXECUTION, new_ec_key, register_kit
from tests.protocol_server import Server, store_client
from trustplane.audit.canonical import payload_matches
from trustplane.audit.sink import pending_row, recent_events
from trustplane.audit_events import AuditEvent, AuditEventType

pytestmark = pytest.mark.asyncio(loop_scope="module")

ISSUED, REFUSED = "oauth:token:issued", "oauth:token:refused"


async def events(server: Server, type_: str) -> list[dict[str, Any]]:
    """Newest first."""
    return await recent_events(server.services.db, limit=100_000, type_=type_)


async def test_issuance_writes_one_issued_event(server: Server) -> None:
    refused_before = len(await events(server, REFUSED))
    token = await server.access_token(scope="order:create order:cancel")
    claims = jwt.decode(token, options={"verify_signature": False})
    matching = [e for e in await events(server, ISSUED) if e["jti"] == claims["jti"]]
    assert len(matching) == 1
    [event] = matching
    assert event["client_id"] == event["subject"] == server.kit.client_id
    assert event["audience"] == EXECUTION
    assert event["scopes"] == ["order:create", "order:cancel"]
    assert event["decision"] == "allow"
    assert event["issuer"] == server.issuer
    assert len(await events(server, REFUSED)) == refused_before


async def test_every_issuance_is_audited(server: Server) -> None:
    jtis = set()
    for _ in range(3):
        token = await server.access_token()
        jtis.add(jwt.decode(token, options={"verify_signature": False})["jti"])
    audited = [e["jti"] for e in await events(server, ISSUED) if e["jti"] in jtis]
    assert sorted(audited) == sorted(jtis)


Refusal = Callable[[Server], Awaitable[httpx.Response]]


async def _bad_signature(s: Server) -> httpx.Response:
    return await s.token(**s.kit.auth(_key=new_ec_key()))


async def _replayed_assertion(s: Server) -> httpx.Response:
    auth = s.kit.auth()
    assert (await s.token(**auth)).status_code == 200
    return await s.token(**auth)


async def _no_client_authentication(s: Server) -> httpx.Response:
    form = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}
    return await s.http.post("/token", data=form)


async def _missing_grant_type(s: Server) -> httpx.Response:
    return await s.token(grant_type=None)


async def _two_auth_methods(s: Server) -> httpx.Response:
    return await s.token(client_id=s.kit.client_id, client_secret="x")


async def _json_body(s: Server) -> httpx.Response:
    return await s.http.post("/token", json={"grant_type": "client_credentials", **s.kit.auth()})


async def _oversized_body(s: Server) -> httpx.Response:
    return await s.token(pad="x" * 70_000)


async def _unknown_grant_type(s: Server) -> httpx.Response:
    return await s.token(grant_type="urn:example:magic")


async def _unknown_scope(s: Server) -> httpx.Response:
    return await s.token(scope="order:teleport")


async def _unknown_resource(s: Server) -> httpx.Response:
    return await s.token(resource="https://unknown.example/api")


async def _not_registered_for_grant(s: Server) -> httpx.Response:
    kit = await register_kit(s.services)
    client = s.services.clients.registry.get(kit.client_id)
    assert client is not None
    metadata = {**client.metadata, "grant_types": ["authorization_code"]}
    await store_client(s.services, dataclasses.replace(client, metadata=metadata))
    return await s.token(kit)


REFUSALS = [
    pytest.param(_bad_signature, "invalid_client", False, id="invalid_client-signature"),
    # A replay is refused after the signature was verified: the event names the client and the jti.
    pytest.param(_replayed_assertion, "invalid_client", True, id="invalid_client-replay"),
    pytest.param(_no_client_authentication, "invalid_client", False, id="invalid_client-none"),
    pytest.param(_missing_grant_type, "invalid_request", False, id="invalid_request-grant_type"),
    # RFC 7521 §4.2.1: several methods, one of them an assertion: invalid_client
    pytest.param(_two_auth_methods, "invalid_client", False, id="invalid_client-two-methods"),
    pytest.param(_json_body, "invalid_request", False, id="invalid_request-json-body"),
    pytest.param(_oversized_body, "invalid_request", False, id="invalid_request-oversized"),
    pytest.param(_unknown_grant_type, "unsupported_grant_type", True, id="unsupported_grant_type"),
    pytest.param(_unknown_scope, "invalid_scope", True, id="invalid_scope"),
    pytest.param(_unknown_resource, "invalid_target", True, id="invalid_target"),
    pytest.param(_not_registered_for_grant, "unauthorized_client", True, id="unauthorized_client"),
]


@pytest.mark.parametrize(("refuse", "error", "authenticated"), REFUSALS)
async def test_every_refusal_writes_one_refused_event(
    server: Server, refuse: Refusal, error: str, authenticated: bool
) -> None:
    refused_before = len(await events(server, REFUSED))
    issued_before = len(await events(server, ISSUED))
    response = await refuse(server)
    assert response.json()["error"] == error, response.text
    refused = await events(server, REFUSED)
    assert len(refused) == refused_before + 1
    newest = refused[0]
    assert newest["reason"] == error
    assert newest["decision"] == "deny"
    if authenticated:
        assert newest["client_id"] is not None
        assert newest["jti"]  # the client assertion's jti
    else:
        assert newest["client_id"] is None
    # a replayed assertion was issued once (its first use), nothing else was
    issued_now = len(await events(server, ISSUED))
    assert issued_now == issued_before + (1 if refuse is _replayed_assertion else 0)


async def test_a_refusal_record_bounds_what_the_caller_sent(server: Server) -> None:
    response = await server.token(resource="https://x.example/" + "a" * 20_000, scope="s" * 5_000)

    assert response.json()["error"] == "invalid_target"
    newest = (await events(server, REFUSED))[0]
    assert newest["audience"] == ("https://x.example/" + "a" * 20_000)[:512]
    assert newest["scopes"] == ["s" * 128]


async def test_the_stored_entry_is_the_envelope_with_the_payload_committed() -> None:
    event = AuditEvent(
        type=AuditEventType.TOKEN_ISSUED,
        issuer="https://as.example",
        scopes=("a", "b"),
        actor_chain=("x",),
        payload={"k": 1},
    )
    entry, payload, salt, *_ = pending_row(event)
    body = orjson.loads(entry)
    expected = event.to_dict()
    del expected["payload"]
    assert {k: v for k, v in body.items() if k != "payload_hash"} == expected
    assert orjson.loads(payload) == {"k": 1}
    assert payload_matches(body, payload.encode(), salt)
    assert not payload_matches(body, b'{"k":2}', salt)
