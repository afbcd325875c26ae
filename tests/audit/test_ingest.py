"""``POST /audit/events``: a service's own signed settlement events into the ledger (SQLite and
PostgreSQL). Recorded under the envelope's ``txn`` with the JWS as evidence; idempotent by
(``iss``, ``jti``), racing duplicates included; every refusal with its exact code and reason, and
nothing of a refused batch written."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import EXECUTION, LEI, ClientKit, new_ec_key
from tests.protocol_server import Server
from trustplane.audit.ingest import entry_id
from trustplane.audit.sink import recent_events
from trustplane.jose.jws import Signer, b64url_encode
from trustplane.reference.events import Envelope, EventSigner, verify_event

pytestmark = pytest.mark.asyncio(loop_scope="module")
SERVICE = EXECUTION  # the events' iss: the audience the service's client is resource server for


def audit(server: Server) -> str:
    return server.issuer + "/audit"


async def service(
    server: Server, signer: EventSigner | None = None, **metadata: Any
) -> tuple[ClientKit, EventSigner]:
    """A service's client as the operator registers it: ``audit:ingest``, resource server for
    ``SERVICE``, its event key (also its private_key_jwt key) in its JWKS."""
    signer = signer or EventSigner(SERVICE, new_ec_key())
    raw: dict[str, Any] = {
        "client_name": "settlement service",
        "lei": LEI,
        "scope": "audit:ingest audit:query order:create",
        "allowed_resources": [audit(server), EXECUTION],
        "introspection_resources": [SERVICE],
        "jwks": signer.jwks(),
    }
    raw.update(metadata)
    reg = await server.services.clients.register(raw, initial_access_token=None)
    return ClientKit(reg.client.client_id, signer.key, server.issuer, kid=signer.kid), signer


def event(signer: EventSigner, txn: str, type_: str = "trade.executed", **data: Any) -> str:
    envelope = Envelope(
        txn, "alice", "desk-app", ({"sub": "broker"},), {"id": "M-1", "version": 2}, None,
        ("dec-1",), "bundle-7",
    )  # fmt: skip
    transition = {"settlement.exception": "exception#1"}.get(type_, "execute")
    return signer.sign(type_, "T-1", transition, "executed", envelope, data)[1]


def forged(signer: EventSigner, typ: str = "trade-event+jwt", **changes: Any) -> str:
    """An event signed by ``signer``'s key with claims changed (``None`` removes one)."""
    claims = orjson.loads(verify_claims(event(signer, "txn-forged"), signer))
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return Signer(signer.key, "ES256", signer.kid, typ).sign(claims)


def verify_claims(jws: str, signer: EventSigner) -> bytes:
    return orjson.dumps(verify_event(jws, signer.jwks(), issuer=signer.issuer))


async def post(
    server: Server, kit: ClientKit, body: Any, raw: bytes | None = None
) -> httpx.Response:
    token = await server.access_token(kit, scope="audit:ingest", resource=audit(server))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    content = raw if raw is not None else orjson.dumps(body)
    return await server.http.post("/audit/events", content=content, headers=headers)


async def trade_entries(server: Server, txn: str) -> list[Any]:
    await server.services.ledger.integrate_all()
    _, found = await server.services.ledger.search({"transaction_id": txn}, 0, 1000)
    return [p for p in found if orjson.loads(p.entry.entry)["type"].startswith("trade:")]


async def test_events_are_recorded_under_their_transaction_with_the_jws(server: Server) -> None:
    kit, signer = await service(server)
    txn = f"txn-{uuid.uuid4().hex[:8]}"
    jws = [
        event(signer, txn, "order.created"),
        event(signer, txn),
        event(signer, txn, "settlement.exception", mandate={"reason": "mandate_not_usable"}),
    ]
    answer = await post(server, kit, {"events": jws})
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert (body["recorded"], body["duplicates"]) == (3, 0)
    assert [r["status"] for r in body["results"]] == ["recorded"] * 3
    found = await trade_entries(server, txn)
    entries = [orjson.loads(p.entry.entry) for p in found]
    assert [e["type"] for e in entries] == [
        "trade:order:created", "trade:trade:executed", "trade:settlement:exception",
    ]  # fmt: skip
    first = entries[2]
    claims = verify_event(jws[2], signer.jwks(), issuer=SERVICE)
    assert first["event_id"] == entry_id(SERVICE, claims["jti"]) == body["results"][2]["event_id"]
    assert (first["issuer"], first["service"], first["jti"]) == (
        SERVICE,
        "trustplane.reference",
        claims["jti"],
    )
    assert (first["subject"], first["client_id"], first["actor_chain"]) == (
        "alice",
        "desk-app",
        ["broker"],
    )
    assert (first["mandate_id"], first["mandate_version"]) == ("M-1", 2)
    assert (first["reason"], first["policy_bundle_version"]) == ("mandate_not_usable", "bundle-7")
    assert first["time"] == claims["iat"] * 1000
    payload = orjson.loads(found[2].entry.payload)
    assert payload["jws"] == jws[2]  # the evidence, verifiable offline with the service's JWKS
    assert payload["exception_id"] == "T-1.1"
    assert payload["ingested_by"] == kit.client_id
    assert verify_event(payload["jws"], signer.jwks(), issuer=SERVICE) == payload["event"]


async def test_a_resent_event_is_a_duplicate_and_not_entered_twice(server: Server) -> None:
    kit, signer = await service(server)
    txn = f"txn-{uuid.uuid4().hex[:8]}"
    jws = [event(signer, txn), event(signer, txn, "allocation.proposed")]
    assert (await post(server, kit, {"events": jws})).json()["recorded"] == 2
    again = await post(server, kit, {"events": [jws[1], jws[0], jws[0]]})
    assert again.status_code == 200, again.text
    assert [r["status"] for r in again.json()["results"]] == ["duplicate"] * 3
    assert len(await trade_entries(server, txn)) == 2
    # one batch holding an event twice records it once
    twice = event(signer, txn, "allocation.approved")
    answer = await post(server, kit, {"events": [twice, twice]})
    assert [r["status"] for r in answer.json()["results"]] == ["recorded", "duplicate"]
    assert len(await trade_entries(server, txn)) == 3


async def test_the_same_jti_with_another_content_is_refused(server: Server) -> None:
    kit, signer = await service(server)
    first = event(signer, f"txn-{uuid.uuid4().hex[:8]}")
    assert (await post(server, kit, {"events": [first]})).json()["recorded"] == 1
    claims = verify_event(first, signer.jwks(), issuer=SERVICE)
    other = Signer(signer.key, "ES256", signer.kid, "trade-event+jwt").sign(
        {**claims, "state": "settled"}
    )
    answer = await post(server, kit, {"events": [other]})
    assert answer.status_code == 400
    assert answer.json()["error_description"] == (
        "event 0: this jti was recorded before with another content"
    )


async def test_racing_requests_with_the_same_event_record_it_once(server: Server) -> None:
    """Eight concurrent requests (on PostgreSQL: eight connections) carry the same events."""
    kit, signer = await service(server)
    txn = f"txn-{uuid.uuid4().hex[:8]}"
    jws = [event(signer, txn), event(signer, txn, "allocation.proposed")]
    token = await server.access_token(kit, scope="audit:ingest", resource=audit(server))
    headers = {"Authorization": f"Bearer {token}"}
    answers = await asyncio.gather(
        *(
            server.http.post("/audit/events", json={"events": jws}, headers=headers)
            for _ in range(8)
        )
    )
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    statuses = [r["status"] for a in answers for r in a.json()["results"]]
    assert statuses.count("recorded") == 2
    assert statuses.count("duplicate") == 14
    assert len(await trade_entries(server, txn)) == 2


def _tampered(signer: EventSigner) -> str:
    head, body, sig = event(signer, "txn-tampered").split(".")
    claims = orjson.loads(_b64d(body))
    claims["state"] = "settled"
    return f"{head}.{b64url_encode(orjson.dumps(claims))}.{sig}"


def _b64d(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


REFUSALS: list[tuple[str, Any, str]] = [
    ("not-a-string", lambda s: 42, "event 0: must be a compact JWS of at most 16384 characters"),
    ("not-a-jws", lambda s: "a.b", "event 0: not a compact JWS"),
    ("alg-none", lambda s: "eyJhbGciOiJub25lIn0.e30.", "event 0: algorithm 'none' is not allowed"),
    ("typ-jwt", lambda s: forged(s, typ="JWT"), "event 0: the header must have alg ES256 and typ trade-event+jwt"),
    ("tampered", _tampered, "event 0: the signature does not verify with the client's registered keys"),
    ("foreign-key", lambda s: event(EventSigner(SERVICE, new_ec_key()), "txn-x"),
     "event 0: the signature does not verify with the client's registered keys"),
    ("foreign-iss", lambda s: forged(s, iss="https://clearing.example"),
     "event 0: iss is not a service this client is registered for"),
    ("iss-list", lambda s: forged(s, iss=[SERVICE]), "event 0: iss is not a service this client is registered for"),
    ("no-jti", lambda s: forged(s, jti=None), "event 0: jti must be a string of 1 to 128 characters"),
    ("long-jti", lambda s: forged(s, jti="j" * 129), "event 0: jti must be a string of 1 to 128 characters"),
    ("unknown-type", lambda s: forged(s, type="trade.teleported"), "event 0: unknown event type 'trade.teleported'"),
    ("no-trade", lambda s: forged(s, trade_id=7), "event 0: trade_id, transition and state must be strings of 1 to 128"),
    ("future-iat", lambda s: forged(s, iat=int(time.time()) + 3600), "event 0: iat must be an integer time, not in the future"),
    ("float-iat", lambda s: forged(s, iat=time.time()), "event 0: iat must be an integer time, not in the future"),
    ("no-envelope", lambda s: forged(s, envelope="x"), "event 0: the envelope must be an object"),
    ("long-txn", lambda s: forged(s, envelope={"txn": "t" * 129}),
     "event 0: the envelope's txn must be a string of 1 to 128 characters"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "description"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
async def test_a_bad_event_is_refused_with_its_reason(
    server: Server, make: Any, description: str
) -> None:
    kit, signer = await service(server)
    answer = await post(server, kit, {"events": [make(signer)]})
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"error": "invalid_request", "error_description": description}
    assert answer.headers["cache-control"] == "no-store"


async def test_one_bad_event_refuses_the_batch_and_nothing_is_written(server: Server) -> None:
    kit, signer = await service(server)
    txn = f"txn-{uuid.uuid4().hex[:8]}"
    answer = await post(server, kit, {"events": [event(signer, txn), _tampered(signer)]})
    assert answer.status_code == 400
    assert answer.json()["error_description"].startswith("event 1: the signature does not verify")
    assert await trade_entries(server, txn) == []
    refused = await recent_events(server.services.db, 20, "audit:event:refused")
    mine = [e for e in refused if e["client_id"] == kit.client_id]
    assert [(e["reason"], e["decision"]) for e in mine] == [("signature", "deny")]
    assert mine[0]["payload"]["position"] == 1


async def test_events_signed_by_another_registered_client_are_refused(server: Server) -> None:
    """No self-granted rights: a client with ``audit:ingest`` cannot record another's events."""
    _, theirs = await service(server)
    mine, _ = await service(server)
    answer = await post(server, mine, {"events": [event(theirs, "txn-theirs")]})
    assert answer.status_code == 400
    assert answer.json()["error_description"].endswith("with the client's registered keys")


async def test_iss_must_be_a_service_the_operator_registered_the_client_for(server: Server) -> None:
    signer = EventSigner("https://settle.example", new_ec_key())
    kit, _ = await service(server, signer)  # resource server for SERVICE, not settle.example
    answer = await post(server, kit, {"events": [event(signer, "txn-iss")]})
    assert answer.json()["error_description"] == (
        "event 0: iss is not a service this client is registered for"
    )


BODIES: list[tuple[str, bytes, int, str]] = [
    ("not-json", b"events", 400, "the body must be a JSON object"),
    ("no-events", b'{"event": []}', 400, 'the body must be {"events": [<compact JWS>, ...]}'),
    ("events-not-a-list", b'{"events": "x"}', 400, 'the body must be {"events": [<compact JWS>, ...]}'),
    ("too-many", orjson.dumps({"events": ["x"] * 101}), 400, "at most 100 events per request"),
    ("too-large", orjson.dumps({"events": ["x" * (1024 * 1024)]}), 413, "the request body is larger than 1048576 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "status", "description"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES]
)
async def test_bad_bodies(server: Server, raw: bytes, status: int, description: str) -> None:
    kit, _ = await service(server)
    answer = await post(server, kit, None, raw=raw)
    assert answer.status_code == status, answer.text
    assert answer.json()["error_description"] == description
    assert answer.json()["error"] == "invalid_request"


async def test_an_empty_batch_records_nothing(server: Server) -> None:
    kit, _ = await service(server)
    answer = await post(server, kit, {"events": []})
    assert answer.json() == {"results": [], "recorded": 0, "duplicates": 0}


async def test_the_guard_answers_401_and_403(server: Server) -> None:
    kit, signer = await service(server)
    body = {"events": [event(signer, "txn-guard")]}
    anonymous = await server.http.post("/audit/events", json=body)
    assert (anonymous.status_code, anonymous.json()["error"]) == (401, "invalid_token")
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="trustplane"'
    query = await server.access_token(kit, scope="audit:query", resource=audit(server))
    refused = await server.http.post(
        "/audit/events", json=body, headers={"Authorization": f"Bearer {query}"}
    )
    assert (refused.status_code, refused.json()["error"]) == (403, "insufficient_scope")
    assert 'scope="audit:ingest"' in refused.headers["www-authenticate"]
    # and a token for the services, not the ledger
    other = await server.access_token(kit, scope="order:create", resource=EXECUTION)
    wrong = await server.http.post(
        "/audit/events", json=body, headers={"Authorization": f"Bearer {other}"}
    )
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_token")


async def test_only_an_operator_registration_grants_audit_ingest(server: Server) -> None:
    """Dynamic registration (RFC 7591) refuses the ledger's internal scope."""
    token = await server.services.clients.create_initial_access_token("tests", lei=LEI)
    answer = await server.http.post(
        "/register",
        json={"client_name": "self", "lei": LEI, "scope": "audit:ingest",
              "allowed_resources": [audit(server)], "jwks": EventSigner.generate(SERVICE).jwks()},
        headers={"Authorization": f"Bearer {token}"},
    )  # fmt: skip
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_client_metadata"
