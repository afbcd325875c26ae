"""``POST /access/v1/simulations``: the simulation admin API (RFC 6750 bearer errors, exact codes)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import EXECUTION, ClientKit, register_kit
from tests.policy.conftest import client, order, trade
from tests.policy.test_simulate import candidate
from trustplane.app import Services
from trustplane.authzen.model import DecisionRequest

PATH = "/access/v1/simulations"


@pytest.fixture
async def admin(services: Services) -> ClientKit:
    pdp = services.settings.issuer + "/access/v1"
    return await register_kit(
        services,
        scope="policy:simulate decision:evaluate order:create",
        allowed_resources=[pdp, EXECUTION],
    )


async def bearer(http: httpx.AsyncClient, kit: ClientKit, scope: str, resource: str) -> str:
    data = {"grant_type": "client_credentials", "scope": scope, "resource": resource, **kit.auth()}
    response = await http.post("/token", data=data)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


async def recorded(services: Services) -> None:
    await services.policy.engine.decide_many(
        [
            DecisionRequest(client(), "order:create", order(), trade(amount_minor=700_000_000)),
            DecisionRequest(client(), "order:create", order("o2"), trade(amount_minor=100)),
        ]
    )


async def test_simulation_of_candidate_files(
    services: Services, http: httpx.AsyncClient, admin: ClientKit
) -> None:
    await recorded(services)
    token = await bearer(http, admin, "policy:simulate", services.settings.issuer + "/access/v1")
    body = {"bundle": {"files": dict(candidate().files)}, "max_flips": 0}
    response = await http.post(PATH, json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["flips"] == {"allow_to_deny": 1, "deny_to_allow": 0}
    assert report["by_reason"]["allow_to_deny"] == {"order.large_ticket_approval": 1}
    assert report["exceeded"] is True
    assert report["candidate_version"] == candidate().version

    active = services.policy.engine.version
    response = await http.post(
        PATH, json={"version": active[:12]}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["flip_count"] == 0


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"version": "0123456789abcdef"}, 404, "unknown_bundle"),
        ({}, 400, "invalid_request"),
        ({"version": "x" * 12, "bundle": {"files": {}}}, 400, "invalid_request"),
        ({"bundle": {"files": {"schema.cedarschema": "entity {"}}}, 422, "invalid_bundle"),
    ],
)
async def test_bad_requests(
    services: Services,
    http: httpx.AsyncClient,
    admin: ClientKit,
    body: dict[str, object],
    status: int,
    error: str,
) -> None:
    token = await bearer(http, admin, "policy:simulate", services.settings.issuer + "/access/v1")
    response = await http.post(PATH, json=body, headers={"Authorization": f"Bearer {token}"})
    assert (response.status_code, response.json()["error"]) == (status, error)


async def test_bearer_errors(services: Services, http: httpx.AsyncClient, admin: ClientKit) -> None:
    pdp = services.settings.issuer + "/access/v1"
    body = {"version": services.policy.engine.version}

    missing = await http.post(PATH, json=body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")

    foreign = await bearer(http, admin, "order:create", EXECUTION)
    wrong_aud = await http.post(PATH, json=body, headers={"Authorization": f"Bearer {foreign}"})
    assert (wrong_aud.status_code, wrong_aud.json()["error"]) == (401, "invalid_token")

    evaluate_only = await bearer(http, admin, "decision:evaluate", pdp)
    scope = await http.post(PATH, json=body, headers={"Authorization": f"Bearer {evaluate_only}"})
    assert (scope.status_code, scope.json()["error"]) == (403, "insufficient_scope")
    assert 'scope="policy:simulate"' in scope.headers["www-authenticate"]

    garbage = await http.post(PATH, json=body, headers={"Authorization": "Bearer not.a.jwt"})
    assert (garbage.status_code, garbage.json()["error"]) == (401, "invalid_token")

    token = await bearer(http, admin, "policy:simulate", pdp)
    revoke = {"token": token, **admin.auth()}
    assert (await http.post("/revoke", data=revoke)).status_code == 200
    revoked = await http.post(PATH, json=body, headers={"Authorization": f"Bearer {token}"})
    assert (revoked.status_code, revoked.json()["error"]) == (401, "invalid_token")
