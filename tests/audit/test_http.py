"""The ledger's HTTP API: the checkpoint and key are public and published in the metadata; proofs,
entries, transactions and queries need our own access token for ``{issuer}/audit`` with scope
``audit:query`` (RFC 6750 errors); answers verify against the signed checkpoint."""

from __future__ import annotations

import base64
from typing import Any

import jwt
import pytest

from tests.audit.ledger_helpers import append, event
from tests.conftest import EXECUTION, ClientKit, register_kit
from tests.protocol_server import Server
from trustplane.audit import merkle
from trustplane.audit.canonical import canonical_bytes
from trustplane.audit.export_verifier import verify_export
from trustplane.audit.note import Verifier, open_checkpoint

pytestmark = pytest.mark.asyncio(loop_scope="module")


def audience(server: Server) -> str:
    return server.issuer + "/audit"


async def auditor(server: Server) -> ClientKit:
    return await register_kit(
        server.services,
        scope="audit:query order:create",
        allowed_resources=[audience(server), EXECUTION],
    )


async def audit_token(server: Server, kit: ClientKit | None = None) -> str:
    kit = kit or await auditor(server)
    return await server.access_token(kit, scope="audit:query", resource=audience(server))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def integrated(server: Server, n: int, **fields: Any) -> None:
    await append(server.services.db, [event(i, **fields) for i in range(n)])
    await server.services.ledger.integrate_all()


async def test_checkpoint_and_key_are_public_and_in_the_metadata(server: Server) -> None:
    metadata = (await server.http.get("/.well-known/oauth-authorization-server")).json()
    key = metadata["audit_log_verifier_key"]
    assert key == (await server.http.get("/audit/public-key")).text.strip()
    assert metadata["audit_checkpoint_endpoint"] == server.issuer + "/audit/checkpoint"
    response = await server.http.get("/audit/checkpoint")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    checkpoint = open_checkpoint(response.text, Verifier.parse(key))
    assert checkpoint.origin == metadata["audit_log_origin"] == "127.0.0.1:8000/audit"


PROTECTED = [
    "/audit/proof/inclusion?index=0&tree_size=1",
    "/audit/proof/consistency?first=1&second=1",
    "/audit/entries?start=0&end=0",
    "/audit/transactions/txn-1",
    "/audit/events",
]


@pytest.mark.parametrize("path", PROTECTED)
async def test_no_token_is_401_without_an_error_code_in_the_challenge(
    server: Server, path: str
) -> None:
    response = await server.http.get(path)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert response.headers["www-authenticate"] == 'Bearer realm="trustplane"'


async def _other_audience(s: Server) -> str:
    return await s.access_token()


async def _expired(s: Server) -> str:
    return s.expired_token()


async def _forged(s: Server) -> str:
    token = await audit_token(s)
    head, body, sig = token.split(".")
    return f"{head}.{body}.{sig[:-4]}AAAA"


async def _revoked(s: Server) -> str:
    kit = await auditor(s)
    token = await audit_token(s, kit)
    revoked = await s.http.post("/revoke", data={"token": token, **kit.auth()})
    assert revoked.status_code == 200
    return token


async def _query_in_the_body_only(s: Server) -> str:
    return "not-a-jwt"


@pytest.mark.parametrize(
    "make",
    [_other_audience, _expired, _forged, _revoked, _query_in_the_body_only],
    ids=["other-audience", "expired", "forged", "revoked", "garbage"],
)
async def test_invalid_tokens_are_401_invalid_token(server: Server, make: Any) -> None:
    token = await make(server)
    for path in PROTECTED:
        response = await server.http.get(path, headers=bearer(token))
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"] == "invalid_token"
        assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_a_token_without_the_scope_is_403_insufficient_scope(server: Server) -> None:
    kit = await register_kit(
        server.services, scope="order:create", allowed_resources=[audience(server), EXECUTION]
    )
    token = await server.access_token(kit, scope="order:create", resource=EXECUTION)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == EXECUTION  # order:create cannot be asked for the audit audience
    kit2 = await register_kit(server.services, allowed_resources=[audience(server)])
    refused = await server.token(kit2, scope="order:create", resource=audience(server))
    assert refused.json()["error"] == "invalid_scope"
    # a token for the audit audience but without audit:query, minted directly by the server's key
    from trustplane.protocol.tokens import issue_access_token

    bare = issue_access_token(
        server.services.keys.ring,
        issuer=server.issuer,
        subject=kit.client_id,
        client_id=kit.client_id,
        audience=audience(server),
        scopes=("order:create",),
        lifetime=60,
    ).token
    for path in PROTECTED:
        response = await server.http.get(path, headers=bearer(bare))
        assert response.status_code == 403
        assert response.json()["error"] == "insufficient_scope"
        assert response.headers["www-authenticate"] == (
            'Bearer realm="trustplane", error="insufficient_scope", '
            'error_description="the access token lacks the scope audit:query", scope="audit:query"'
        )
    from trustplane.audit.sink import recent_events

    refused = await recent_events(server.services.db, limit=5, type_="audit:ledger:queried")
    assert refused[0]["client_id"] == kit.client_id
    assert (refused[0]["decision"], refused[0]["reason"]) == ("deny", "insufficient_scope")


async def test_inclusion_and_consistency_proofs_verify(server: Server) -> None:
    token = await audit_token(server)
    first = open_checkpoint(
        (await server.http.get("/audit/checkpoint")).text,
        Verifier.parse(await server.services.ledger.verifier_key()),
    )
    await integrated(server, 9)
    latest = open_checkpoint(
        (await server.http.get("/audit/checkpoint")).text,
        Verifier.parse(await server.services.ledger.verifier_key()),
    )
    entries = (
        await server.http.get(
            f"/audit/entries?start=0&end={latest.size + 50}", headers=bearer(token)
        )
    ).json()["entries"]
    assert [e["index"] for e in entries] == list(range(latest.size))
    for entry in entries:
        leaf = merkle.leaf_hash(canonical_bytes(entry["entry"]))
        proof = (
            await server.http.get(
                f"/audit/proof/inclusion?index={entry['index']}&tree_size={latest.size}",
                headers=bearer(token),
            )
        ).json()
        path = [base64.b64decode(h) for h in proof["audit_path"]]
        assert merkle.verify_inclusion(entry["index"], latest.size, leaf, path, latest.root)
    if first.size:
        answer = await server.http.get(
            f"/audit/proof/consistency?first={first.size}&second={latest.size}",
            headers=bearer(token),
        )
        path = [base64.b64decode(h) for h in answer.json()["consistency"]]
        assert merkle.verify_consistency(first.size, latest.size, first.root, latest.root, path)


async def test_a_transaction_is_its_chain_of_authority_with_proofs(server: Server) -> None:
    token = await audit_token(server)
    txn = f"txn-{server.services.settings.issuer[-4:]}-chain"
    await integrated(server, 3, transaction_id=txn)
    await integrated(server, 4)
    body = (await server.http.get(f"/audit/transactions/{txn}", headers=bearer(token))).json()
    assert body["transaction_id"] == txn
    assert len(body["entries"]) == 3
    indices = [e["index"] for e in body["entries"]]
    assert indices == sorted(indices)
    report = verify_export(
        body["entries"], body["checkpoint"], await server.services.ledger.verifier_key()
    )
    assert report.ok, report.failures
    assert any("3 inclusion proofs verify" in line for line in report.proved)


async def test_events_are_filtered_and_paginated(server: Server) -> None:
    token = await audit_token(server)
    await append(server.services.db, [event(i, subject="alice-pagination") for i in range(7)])
    await server.services.ledger.integrate_all()
    seen: list[int] = []
    after = 0
    while True:
        page = (
            await server.http.get(
                "/audit/events",
                params={"subject": "alice-pagination", "limit": 3, "after": after},
                headers=bearer(token),
            )
        ).json()
        seen += [e["index"] for e in page["entries"]]
        assert all(e["entry"]["subject"] == "alice-pagination" for e in page["entries"])
        if page["next"] is None:
            break
        after = page["next"]
    assert len(seen) == 7
    assert seen == sorted(seen)
    typed = await server.http.get(
        "/audit/events",
        params={"type": "keys:key:created", "since": 0, "until": 2**42},
        headers=bearer(token),
    )
    assert {e["entry"]["type"] for e in typed.json()["entries"]} == {"keys:key:created"}


@pytest.mark.parametrize(
    "path",
    [
        "/audit/proof/inclusion?index=0",
        "/audit/proof/inclusion?index=-1&tree_size=1",
        "/audit/proof/inclusion?index=x&tree_size=1",
        "/audit/proof/inclusion?index=5&tree_size=5",
        "/audit/proof/inclusion?index=0&tree_size=999999999",
        "/audit/proof/consistency?first=0&second=1",
        "/audit/proof/consistency?first=3&second=2",
        "/audit/entries?start=5&end=1",
        "/audit/entries?start=999999999&end=999999999",
        "/audit/events?colour=blue",
        "/audit/events?since=yesterday",
        "/audit/events?limit=0",
    ],
)
async def test_bad_parameters_are_400_invalid_request(server: Server, path: str) -> None:
    token = await audit_token(server)
    await integrated(server, 2)
    response = await server.http.get(path, headers=bearer(token))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert response.headers["cache-control"] == "no-store"


async def test_protected_answers_are_not_cached(server: Server) -> None:
    token = await audit_token(server)
    response = await server.http.get("/audit/events", headers=bearer(token))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"


async def test_reading_the_ledger_is_itself_recorded(server: Server) -> None:
    from trustplane.audit.sink import recent_events

    kit = await auditor(server)
    token = await audit_token(server, kit)
    response = await server.http.get(
        "/audit/events", params={"subject": "x"}, headers=bearer(token)
    )
    assert response.status_code == 200
    [newest] = await recent_events(server.services.db, limit=1, type_="audit:ledger:queried")
    assert newest["client_id"] == kit.client_id
    assert newest["decision"] == "allow"
    assert newest["payload"] == {"path": "/audit/events", "query": "subject=x"}
