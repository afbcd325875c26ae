"""Mandates on real servers: two ``trustplane serve`` processes share one database; a mandate is
created and revoked through the management API of one, and the other stops accepting the mandate's
tokens at introspection within the cache-refresh bound; the signed security event arrives on NATS
JetStream; the CLI sees the same history."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import (
    EXECUTION,
    KEK,
    LEI,
    ClientKit,
    jwks_for,
    new_ec_key,
    require_service,
    run_sync,
)
from tests.e2e.conftest import (
    PROPAGATION_TIMEOUT,
    LiveServer,
    LiveServers,
    client_credentials_token,
    introspect,
    knows_client,
    register_client,
    wait_until,
)
from tests.mandates.conftest import GRANTOR, TRADE
from trustplane.app import Services
from trustplane.mandates.events import SESSION_REVOKED
from trustplane.protocol.tokens import issue_access_token
from trustplane.settings import Settings

pytestmark = pytest.mark.e2e
NATS_URL = "nats://127.0.0.1:4222"


def grantee(server: LiveServer, *others: LiveServer) -> ClientKit:
    key = new_ec_key()
    jwks_file = Path(server.env["TRUSTPLANE_DATA_DIR"]) / f"grantee-{secrets.token_hex(3)}.json"
    jwks_file.write_text(json.dumps(jwks_for(key)))
    body = server.cli_json(
        "clients", "add", "--lei", LEI, "--jwks-file", str(jwks_file), "--scope", "order:create",
        "--resource", EXECUTION, "--authorization-details-type", "trade_instruction",
    )  # fmt: skip
    assert body["authorization_details_types"] == ["trade_instruction"]
    kit = ClientKit(body["client_id"], key, server.issuer)
    for each in (server, *others):
        wait_until(lambda s=each: knows_client(s, kit), PROPAGATION_TIMEOUT, "the grantee")
    return kit


def mandate_token(server: LiveServer, kit: ClientKit, ref: dict[str, Any]) -> str:
    """What the code/refresh grants issue: signed with the cluster's key, bound to the mandate."""

    async def mint() -> str:
        env = server.env
        settings = Settings(
            database_url=env["TRUSTPLANE_DATABASE_URL"], data_dir=Path(env["TRUSTPLANE_DATA_DIR"]),
            key_encryption_key=KEK, issuer=server.issuer,
        )  # fmt: skip
        svc = Services.build(settings)
        try:
            ring = await svc.keys.load()
            return issue_access_token(
                ring, issuer=server.issuer, subject="alice", client_id=kit.client_id,
                audience=EXECUTION, scopes=("order:create",), lifetime=300,
                extra={"mandate": ref, "authorization_details": [TRADE], "lei": LEI},
            ).token  # fmt: skip
        finally:
            await svc.db.dispose()

    token: str = run_sync(mint())
    return token


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_revocation_reaches_every_server_and_the_event_stream(
    request: pytest.FixtureRequest, live_server: LiveServers, database: str
) -> None:
    require_service("NATS", "127.0.0.1", 4222)
    tag = secrets.token_hex(4)
    stream, subject = f"TP_E2E_{tag}", f"tp_e2e_{tag}.secevents"
    url = request.getfixturevalue("pg_url") if database == "postgresql" else None
    a, b = live_server.start_cluster(
        2, url, nats_url=NATS_URL, nats_stream=stream, nats_subject=subject
    )
    api = a.issuer + "/mandates"
    admin = register_client(
        a,
        b,
        scopes=("mandate:view", "mandate:administer"),
        resources=(api,),
        introspection_resources=(),
    )
    kit = grantee(a, b)
    token = client_credentials_token(a, admin, "mandate:view mandate:administer", api)
    auth = {"Authorization": f"Bearer {token}"}

    created = httpx.post(
        f"{a.base_url}/mandates",
        json={"grantor_lei": GRANTOR, "grantor_person": "alice", "grantee_client_id": kit.client_id,
              "scopes": ["order:create"], "authorization_details": [TRADE], "accepted_by": "alice"},
        headers=auth, timeout=10,
    )  # fmt: skip
    assert created.status_code == 201, created.text
    mandate = created.json()
    live = mandate_token(a, kit, {"id": mandate["id"], "version": 1})
    seen_by_b = introspect(b, kit, live)
    assert seen_by_b["active"] is True  # b now holds the mandate in its cache
    assert (seen_by_b["mandate"], seen_by_b["authorization_details"]) == (
        {"id": mandate["id"], "version": 1},
        [TRADE],
    )

    async def revoke_and_receive() -> Any:
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            await js.add_stream(name=stream, subjects=[f"{subject}.>"])
            sub = await js.subscribe(f"{subject}.>", deliver_policy="all")
            async with httpx.AsyncClient(timeout=10) as http:
                revoked = await http.post(
                    f"{a.base_url}/mandates/{mandate['id']}/revoke",
                    json={"reason": "withdrawn"},
                    headers=auth,
                )
            assert revoked.status_code == 200, revoked.text
            message = await sub.next_msg(timeout=10)
            await js.delete_stream(stream)
            return message
        finally:
            await nc.close()

    message = run_sync(asyncio.wait_for(revoke_and_receive(), 60))

    assert introspect(a, kit, live) == {"active": False}  # the revoking server: at once
    wait_until(
        lambda: introspect(b, kit, live) == {"active": False},
        PROPAGATION_TIMEOUT,
        "b to see the revocation",
    )
    assert message.subject == f"{subject}.session-revoked"
    jwks = httpx.get(f"{a.base_url}/jwks", timeout=10).json()
    header = jwt.get_unverified_header(message.data.decode())
    key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == header["kid"]))
    claims = jwt.decode(message.data.decode(), key, algorithms=[header["alg"]], issuer=a.issuer)
    assert header["typ"] == "secevent+jwt"
    assert claims["mandate"] == {"id": mandate["id"], "version": 1}
    assert claims["events"][SESSION_REVOKED]["reason_admin"] == {"en": "withdrawn"}

    history = httpx.get(
        f"{b.base_url}/mandates/{mandate['id']}/history", headers=auth, timeout=10
    ).json()
    assert [c["action"] for c in history["changes"]] == ["created", "revoked"]
    listed = b.cli_json("mandates", "list", "--status", "revoked")
    assert [m["id"] for m in listed] == [mandate["id"]]
