"""The partner admin API: bearer tokens for {issuer}/federation with scope partner:administer."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import EXECUTION, LEI, ClientKit, _Started, register_kit
from tests.federation.partners import Partner
from tests.protocol_server import Server
from trustplane.app import create_app, create_ops_app
from trustplane.audit.sink import recent_events
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")


def admin_audience(server: Server) -> str:
    return f"{server.issuer}/federation"


async def admin_kit(server: Server) -> ClientKit:
    return await register_kit(
        server.services,
        scope="partner:administer order:create",
        allowed_resources=[admin_audience(server), EXECUTION],
    )


async def admin_token(server: Server) -> str:
    kit = await admin_kit(server)
    return await server.access_token(
        kit, scope="partner:administer", resource=admin_audience(server)
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_schema_is_published_without_authentication(server: Server) -> None:
    response = await server.http.get("/federation/trust-profile.schema.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/schema+json"
    assert response.json()["title"] == "trustplane partner trust profile"


async def test_add_show_update_list_disable(server: Server) -> None:
    headers = bearer(await admin_token(server))
    partner = Partner("partner-api", "https://idp.api.example", server.issuer)
    http = server.http

    added = await http.post("/federation/partners", json=partner.profile(), headers=headers)
    yaml_doc = yaml.safe_dump(partner.profile(max_assertion_lifetime=60))
    updated = await http.put(
        "/federation/partners/partner-api",
        content=yaml_doc,
        headers={**headers, "content-type": "application/yaml"},
    )
    shown = await http.get("/federation/partners/partner-api", headers=headers)
    listed = await http.get("/federation/partners", headers=headers)
    disabled = await http.post(
        "/federation/partners/partner-api/disable?reason=test", headers=headers
    )
    versions = await http.get("/federation/partners/partner-api/versions", headers=headers)

    assert added.status_code == 201, added.text
    assert (added.json()["version"], added.json()["status"]) == (1, "active")
    assert updated.status_code == 200, updated.text
    assert shown.json()["profile"]["max_assertion_lifetime"] == 60
    assert "partner-api" in [p["partner_id"] for p in listed.json()["partners"]]
    assert (disabled.status_code, disabled.json()["status"]) == (200, "disabled")
    assert [v["version"] for v in versions.json()["versions"]] == [1, 2, 3]
    assert server.services.federation.registry.get("partner-api").active is False  # type: ignore[union-attr]
    events = await recent_events(server.services.db, 3)
    assert [e["type"] for e in events] == [
        "federation:partner:disabled",
        "federation:partner:updated",
        "federation:partner:added",
    ]
    changed_by = {e["payload"]["changed_by"] for e in events}
    assert len(changed_by) == 1
    assert changed_by.pop().startswith("tp-")


async def test_invalid_documents_are_400_with_every_problem(server: Server) -> None:
    headers = bearer(await admin_token(server))
    doc = Partner("partner-bad", "https://idp.bad.example", server.issuer).profile(
        lei="123", algorithms=["HS256"]
    )
    response = await server.http.post("/federation/partners", json=doc, headers=headers)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_trust_profile"
    assert len(body["errors"]) >= 2
    for content, kind in ((b"{not json", "application/json"), (b"a: [", "application/yaml")):
        bad = await server.http.post(
            "/federation/partners", content=content, headers={**headers, "content-type": kind}
        )
        assert (bad.status_code, bad.json()["error"]) == (400, "invalid_trust_profile")
    wrong_type = await server.http.post(
        "/federation/partners", content=b"x", headers={**headers, "content-type": "text/plain"}
    )
    assert wrong_type.status_code == 400


async def test_conflicts_and_unknown_partners(server: Server) -> None:
    headers = bearer(await admin_token(server))
    p = Partner("partner-dup", "https://idp.dup.example", server.issuer)
    first = await server.http.post("/federation/partners", json=p.profile(), headers=headers)
    again = await server.http.post("/federation/partners", json=p.profile(), headers=headers)
    missing = await server.http.get("/federation/partners/partner-nope", headers=headers)
    assert first.status_code == 201
    assert (again.status_code, again.json()["error"]) == (409, "partner_exists")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")


def _forged(server: Server, **claims: Any) -> str:
    base: dict[str, Any] = {
        "issuer": server.issuer,
        "subject": server.kit.client_id,
        "client_id": server.kit.client_id,
        "audience": admin_audience(server),
        "scopes": ("partner:administer",),
        "lifetime": 60,
        "extra": {"lei": LEI},
    }
    base.update(claims)
    return issue_access_token(server.services.keys.ring, **base).token


async def test_authentication_and_scope_refusals(server: Server) -> None:
    other_audience = await server.access_token()  # an EXECUTION token of the module's client
    cases: list[tuple[dict[str, str], int, str]] = [
        ({}, 401, "invalid_token"),
        (bearer("not-a-token"), 401, "invalid_token"),
        (bearer(other_audience), 401, "invalid_token"),
        (bearer(_forged(server, lifetime=-120)), 401, "invalid_token"),
        (bearer(_forged(server, scopes=("order:create",))), 403, "insufficient_scope"),
    ]
    for headers, status, error in cases:
        response = await server.http.get("/federation/partners", headers=headers)
        assert (response.status_code, response.json()["error"]) == (status, error), headers
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_revoked_admin_token_is_refused(server: Server) -> None:
    kit = await admin_kit(server)
    token = await server.access_token(
        kit, scope="partner:administer", resource=admin_audience(server)
    )
    revoked = await server.http.post("/revoke", data={"token": token, **kit.auth()})
    assert revoked.status_code == 200
    response = await server.http.get("/federation/partners", headers=bearer(token))
    assert (response.status_code, response.json()["error"]) == (401, "invalid_token")


async def test_admin_routes_are_in_the_openapi_document(server: Server) -> None:
    """The document is served by the operations listener (``create_ops_app``), not the public one."""
    public = create_app(server.services.settings, services=_Started(server.services))  # type: ignore[arg-type]
    ops = create_ops_app(server.services, public.openapi)
    transport = httpx.ASGITransport(app=ops)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/federation/partners", "/federation/partners/{partner_id}"} <= set(paths)
    assert httpx.codes.OK
