"""The mandate is checked at introspection: a token whose ``mandate`` claim points to a revoked,
suspended, expired or superseded mandate is ``{"active": false}`` at once; the granted
``authorization_details`` and the ``mandate`` reference are returned while it is active."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import EXECUTION
from tests.mandates.conftest import TRADE, grantee, terms
from tests.protocol_server import Server
from trustplane.mandates.model import Mandate
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")
INACTIVE = {"active": False}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client_id(server: Server) -> str:
    return (await grantee(server.services)).client_id


async def mandate(server: Server, client_id: str, **overrides: Any) -> Mandate:
    return await server.services.mandates.create(
        terms(client_id, **overrides), actor="admin", accepted_by="alice"
    )


def token(server: Server, client_id: str, ref: Any, details: Any = (TRADE,)) -> str:
    """What the authorization_code/refresh grants issue: a token bound to a mandate version."""
    extra: dict[str, Any] = {"mandate": ref, "authorization_details": list(details), "lei": "x"}
    return issue_access_token(
        server.services.keys.ring, issuer=server.issuer, subject="alice", client_id=client_id,
        audience=EXECUTION, scopes=("order:create",), lifetime=300, extra=extra,
    ).token  # fmt: skip


async def introspect(server: Server, value: str) -> dict[str, Any]:
    response = await server.http.post("/introspect", data={"token": value, **server.kit.auth()})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_active_token_carries_mandate_and_details(server: Server, client_id: str) -> None:
    m = await mandate(server, client_id)
    body = await introspect(server, token(server, client_id, m.ref))
    assert body["active"] is True
    assert body["mandate"] == {"id": m.id, "version": 1}
    assert body["authorization_details"] == [TRADE]


async def test_revocation_makes_live_tokens_inactive_at_once(
    server: Server, client_id: str
) -> None:
    m = await mandate(server, client_id)
    live = token(server, client_id, m.ref)
    assert (await introspect(server, live))["active"] is True
    await server.services.mandates.revoke(m.id, actor="alice")
    assert await introspect(server, live) == INACTIVE


async def test_suspension_is_inactive_until_resumed(server: Server, client_id: str) -> None:
    m = await mandate(server, client_id)
    live = token(server, client_id, m.ref)
    await server.services.mandates.suspend(m.id, actor="ops")
    assert await introspect(server, live) == INACTIVE
    await server.services.mandates.resume(m.id, actor="ops")
    assert (await introspect(server, live))["active"] is True


async def test_amendment_supersedes_the_old_versions_tokens(server: Server, client_id: str) -> None:
    m = await mandate(server, client_id)
    old = token(server, client_id, m.ref)
    v2 = await server.services.mandates.amend(
        m.id, actor="ops", changes={"scopes": ["order:create", "order:cancel"]}
    )
    assert await introspect(server, old) == INACTIVE
    assert (await introspect(server, token(server, client_id, v2.ref)))["mandate"]["version"] == 2


async def test_expired_mandate(server: Server, client_id: str) -> None:
    m = await mandate(server, client_id, effective_until=int(time.time()) + 2)
    live = token(server, client_id, m.ref)
    assert (await introspect(server, live))["active"] is True
    time.sleep(2.1)  # noqa: ASYNC251 - the clock has to pass effective_until; nothing else to await
    assert await introspect(server, live) == INACTIVE


@pytest.mark.parametrize(
    "ref",
    [
        {"id": "mdt_unknown", "version": 1},
        {"id": "x", "version": "1"},
        {"version": 1},
        "mdt_abc",
        [1],
    ],
)
async def test_unknown_or_malformed_mandate_claim_fails_closed(
    server: Server, client_id: str, ref: Any
) -> None:
    assert await introspect(server, token(server, client_id, ref)) == INACTIVE


async def test_token_without_mandate_is_unaffected(server: Server) -> None:
    assert (await introspect(server, await server.access_token()))["active"] is True
