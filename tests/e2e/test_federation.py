"""Federation end to end: real `trustplane serve` processes, trust profiles added with the CLI,
partner assertions minted with PyJWT, tokens requested over HTTP; the replay race on PostgreSQL."""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key, run_sync
from tests.e2e.conftest import (
    PROPAGATION_TIMEOUT,
    LiveServer,
    LiveServers,
    knows_client,
    race,
    running_servers,
    wait_until,
)
from tests.federation.partners import JWT_BEARER, Partner
from trustplane.audit.sink import recent_events
from trustplane.storage.db import Database

pytestmark = pytest.mark.e2e
RACERS = 40


def add_partner(server: LiveServer, partner: Partner) -> dict[str, Any]:
    path = Path(server.env["TRUSTPLANE_DATA_DIR"]) / f"{partner.partner_id}.yaml"
    path.write_text(yaml.safe_dump(partner.profile()))
    return dict(server.cli_json("partners", "add", str(path)))


def register_federated_client(*servers: LiveServer) -> ClientKit:
    """A private_key_jwt client allowed the jwt-bearer grant, registered with the CLI."""
    first, key, kid = servers[0], new_ec_key(), "e2e-fed-1"
    jwks_file = Path(first.env["TRUSTPLANE_DATA_DIR"]) / f"jwks-{time.monotonic_ns()}.json"
    jwks_file.write_text(json.dumps(jwks_for(key, kid)))
    body = first.cli_json(
        "clients", "add", "--lei", LEI, "--jwks-file", str(jwks_file),
        "--scope", "order:create", "--resource", EXECUTION,
        "--grant-type", "client_credentials", "--grant-type", JWT_BEARER,
        "--introspection-resource", EXECUTION,
    )  # fmt: skip
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kit = ClientKit(body["client_id"], key, first.issuer, kid=kid, pem=pem)
    for server in servers:
        wait_until(lambda s=server: knows_client(s, kit), PROPAGATION_TIMEOUT, "client loaded")
    return kit


def grant_form(kit: ClientKit, assertion: str) -> dict[str, str]:
    return {
        "grant_type": JWT_BEARER,
        "assertion": assertion,
        "scope": "order:create",
        "resource": EXECUTION,
        **kit.auth(),
    }


def wait_for_partner(server: LiveServer, kit: ClientKit, partner: Partner) -> None:
    """Until the server's registry has the partner: a probe assertion is no longer refused as
    coming from an untrusted issuer (each probe is a fresh assertion, so probes never replay)."""

    def trusted() -> bool:
        response = httpx.post(
            f"{server.base_url}/token", data=grant_form(kit, partner.assertion()), timeout=10
        )
        return response.status_code == 200

    wait_until(trusted, PROPAGATION_TIMEOUT, f"server to trust {partner.partner_id}", step=0.2)


async def audit_events(database_url: str, type_: str, client_id: str) -> list[dict[str, Any]]:
    """The ledger's events of one type for one client, oldest first (pending or integrated)."""
    db = Database(database_url)
    try:
        events = await recent_events(db, limit=100_000, type_=type_)
    finally:
        await db.dispose()
    return [e for e in reversed(events) if e["client_id"] == client_id]


def refusal_reasons(server: LiveServer, client_id: str) -> list[list[str]]:
    url = server.env["TRUSTPLANE_DATABASE_URL"]
    events = run_sync(audit_events(url, "oauth:token:refused", client_id))
    return [e["reason_ids"] for e in events]


def test_jwt_bearer_over_http_with_the_cli(live_server: LiveServers) -> None:
    server = live_server.start()
    partner = Partner("arranger-e2e", "https://idp.arranger-e2e.example", server.issuer)
    added = add_partner(server, partner)
    kit = register_federated_client(server)
    wait_for_partner(server, kit, partner)

    assertion = partner.assertion(sub="alice@arranger")
    response = httpx.post(f"{server.base_url}/token", data=grant_form(kit, assertion), timeout=10)
    replay = httpx.post(f"{server.base_url}/token", data=grant_form(kit, assertion), timeout=10)

    assert added["version"] == 1
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    jwks = jwt.PyJWKSet.from_dict(httpx.get(f"{server.base_url}/jwks", timeout=10).json())
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(
        token,
        jwks[header["kid"]],
        algorithms=[header["alg"]],
        audience=EXECUTION,
        issuer=server.issuer,
    )
    assert claims["sub"] == "partner:arranger-e2e:alice@arranger"
    assert claims["origin"] == {"iss": partner.issuer, "sub": "alice@arranger"}
    assert (claims["partner"], claims["desk"]) == ("arranger-e2e", "rates-emea")
    introspected = httpx.post(
        f"{server.base_url}/introspect", data={"token": token, **kit.auth()}, timeout=10
    ).json()
    assert introspected["active"] is True
    assert (introspected["sub"], introspected["origin"]) == (claims["sub"], claims["origin"])
    assert introspected["partner"] == "arranger-e2e"
    assert (replay.status_code, replay.json()["error"]) == (400, "invalid_grant")
    assert refusal_reasons(server, kit.client_id)[-1] == ["replay"]

    listed = server.cli_json("partners", "list")
    shown = server.cli_json("partners", "show", "arranger-e2e")
    server.cli("partners", "disable", "arranger-e2e", "--reason", "e2e")
    assert [p["partner_id"] for p in listed] == ["arranger-e2e"]
    assert shown["profile"]["issuers"] == [partner.issuer]

    def refused_as_disabled() -> bool:
        again = httpx.post(
            f"{server.base_url}/token", data=grant_form(kit, partner.assertion()), timeout=10
        )
        return again.status_code == 400 and again.json()["error"] == "invalid_grant"

    wait_until(refused_as_disabled, PROPAGATION_TIMEOUT, "the disable to propagate", step=0.2)
    assert refusal_reasons(server, kit.client_id)[-1] == ["partner_disabled"]
    assert server.cli_json("partners", "show", "arranger-e2e")["status"] == "disabled"


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LiveServer]]:
    """Two servers on one PostgreSQL database (as behind a load balancer)."""
    database_url: str = request.getfixturevalue("module_pg_url")
    with running_servers(tmp_path_factory.mktemp("fed-cluster")) as servers:
        yield servers.start_cluster(2, database_url)


@pytest.mark.postgres
def test_racing_replays_of_one_partner_assertion_issue_exactly_one_token(
    cluster: list[LiveServer],
) -> None:
    partner = Partner("racer", "https://idp.racer.example", cluster[0].issuer)
    add_partner(cluster[0], partner)
    kit = register_federated_client(*cluster)
    for server in cluster:
        wait_for_partner(server, kit, partner)
    assertion = partner.assertion()
    forms = [grant_form(kit, assertion) for _ in range(RACERS)]  # fresh client assertion each

    responses = run_sync(race(cluster, "/token", [{"data": form} for form in forms]))

    counts = collections.Counter(r.status_code for r in responses)
    assert counts == {200: 1, 400: RACERS - 1}
    assert {r.json()["error"] for r in responses if r.status_code == 400} == {"invalid_grant"}
    (winner,) = (r.json()["access_token"] for r in responses if r.status_code == 200)
    winner_jti = jwt.decode(winner, options={"verify_signature": False})["jti"]
    url = cluster[0].env["TRUSTPLANE_DATABASE_URL"]
    jtis = [e["jti"] for e in run_sync(audit_events(url, "oauth:token:issued", kit.client_id))]
    assert winner_jti in jtis
    assert len(jtis) == 1 + len(cluster)  # the winner plus one wait_for_partner probe per server
    reasons = refusal_reasons(cluster[0], kit.client_id)
    assert reasons.count(["replay"]) == RACERS - 1
