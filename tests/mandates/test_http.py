"""The management API: bearer tokens for ``{issuer}/mandates``; ``mandate:view`` reads,
``mandate:administer`` changes; exact status and error code for every refusal."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import EXECUTION, ClientKit, register_kit
from tests.mandates.conftest import GRANTOR, TRADE, grantee
from tests.protocol_server import Server
from tests.rar.test_registry import with_

pytestmark = pytest.mark.asyncio(loop_scope="module")
ADMIN_SCOPES = "mandate:view mandate:administer"


def api(server: Server) -> str:
    return server.issuer + "/mandates"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def admin(server: Server) -> ClientKit:
    return await register_kit(
        server.services,
        scope=ADMIN_SCOPES,
        allowed_resources=[api(server)],
        introspection_resources=[],
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def grantee_id(server: Server) -> str:
    return (await grantee(server.services)).client_id


async def bearer(server: Server, kit: ClientKit, scope: str = ADMIN_SCOPES) -> dict[str, str]:
    token = await server.access_token(kit, scope=scope, resource=api(server))
    return {"Authorization": f"Bearer {token}"}


def body(grantee_id: str, **overrides: Any) -> dict[str, Any]:
    out = {
        "grantor_lei": GRANTOR,
        "grantor_person": "alice",
        "grantee_client_id": grantee_id,
        "scopes": ["order:create"],
        "authorization_details": [TRADE],
        "effective_until": int(time.time()) + 86400 * 30,
        "legal_basis": "standing_instruction",
        "document_ref": "SI-2026-0042",
    }
    out.update(overrides)
    return out


async def create(
    server: Server, admin: ClientKit, grantee_id: str, **overrides: Any
) -> dict[str, Any]:
    response = await server.http.post(
        "/mandates", json=body(grantee_id, **overrides), headers=await bearer(server, admin)
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_lifecycle_over_http(server: Server, admin: ClientKit, grantee_id: str) -> None:
    auth = await bearer(server, admin)
    created = await create(server, admin, grantee_id)
    assert (created["status"], created["version"]) == ("proposed", 1)
    assert created["grantee"]["client_id"] == grantee_id
    mid = created["id"]

    accepted = await server.http.post(
        f"/mandates/{mid}/accept", json={"accepted_by": "alice"}, headers=auth
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "active"

    narrower = with_(TRADE, "accounts", ["ACC-1"])
    amended = await server.http.post(
        f"/mandates/{mid}/amend",
        json={"authorization_details": [narrower], "expected_version": 1, "reason": "tighten"},
        headers=auth,
    )
    assert amended.status_code == 200, amended.text
    assert amended.json()["version"] == 2

    old = await server.http.get(f"/mandates/{mid}", params={"version": 1}, headers=auth)
    assert (old.json()["version"], old.json()["status"]) == (1, "superseded")
    assert old.headers["cache-control"] == "no-store"

    suspended = await server.http.post(
        f"/mandates/{mid}/suspend", json={"reason": "review"}, headers=auth
    )
    assert suspended.json()["status"] == "suspended"
    resumed = await server.http.post(f"/mandates/{mid}/resume", headers=auth)
    assert resumed.json()["status"] == "active"
    revoked = await server.http.post(
        f"/mandates/{mid}/revoke", json={"reason": "withdrawn"}, headers=auth
    )
    assert (revoked.status_code, revoked.json()["status"]) == (200, "revoked")

    history = (await server.http.get(f"/mandates/{mid}/history", headers=auth)).json()
    assert [v["version"] for v in history["versions"]] == [1, 2]
    assert [c["action"] for c in history["changes"]] == [
        "created",
        "accepted",
        "amended",
        "suspended",
        "resumed",
        "revoked",
    ]
    assert {c["actor"] for c in history["changes"]} == {f"client:{admin.client_id}"}


async def test_list_filters(server: Server, admin: ClientKit, grantee_id: str) -> None:
    auth = await bearer(server, admin)
    soon = await create(
        server, admin, grantee_id, effective_until=int(time.time()) + 3 * 86400, accepted_by="alice"
    )
    response = await server.http.get(
        "/mandates",
        params={
            "grantor": GRANTOR,
            "grantee": grantee_id,
            "status": "active",
            "expiring_within_days": 5,
        },
        headers=auth,
    )
    assert response.status_code == 200, response.text
    assert [m["id"] for m in response.json()["mandates"]] == [soon["id"]]
    for params in (
        {"status": "sleeping"},
        {"limit": "0"},
        {"limit": "x"},
        {"expiring_within_days": "-1"},
        {"colour": "red"},
    ):
        bad = await server.http.get("/mandates", params=params, headers=auth)
        assert (bad.status_code, bad.json()["error"]) == (400, "invalid_request"), params


async def test_read_scope_cannot_change(server: Server, admin: ClientKit, grantee_id: str) -> None:
    created = await create(server, admin, grantee_id)
    viewer = await bearer(server, admin, scope="mandate:view")
    assert (await server.http.get(f"/mandates/{created['id']}", headers=viewer)).status_code == 200
    refused = await server.http.post(f"/mandates/{created['id']}/revoke", headers=viewer)
    assert (refused.status_code, refused.json()["error"]) == (403, "insufficient_scope")
    assert 'scope="mandate:administer"' in refused.headers["www-authenticate"]


AUTH_FAILURES = [
    ("no token", {}, 401, "invalid_token"),
    ("basic scheme", {"Authorization": "Basic eDp5"}, 401, "invalid_token"),
    ("garbage", {"Authorization": "Bearer nope"}, 401, "invalid_token"),
]


@pytest.mark.parametrize(
    ("headers", "status", "code"), [a[1:] for a in AUTH_FAILURES], ids=[a[0] for a in AUTH_FAILURES]
)
async def test_authentication_failures(
    server: Server, headers: dict[str, str], status: int, code: str
) -> None:
    response = await server.http.get("/mandates", headers=headers)
    assert (response.status_code, response.json()["error"]) == (status, code)


async def test_token_for_another_audience_is_refused(server: Server) -> None:
    token = await server.access_token(resource=EXECUTION)
    response = await server.http.get("/mandates", headers={"Authorization": f"Bearer {token}"})
    assert (response.status_code, response.json()["error"]) == (401, "invalid_token")


async def test_revoked_admin_token_is_refused(server: Server, admin: ClientKit) -> None:
    token = await server.access_token(admin, scope=ADMIN_SCOPES, resource=api(server))
    revoked = await server.http.post("/revoke", data={"token": token, **admin.auth()})
    assert revoked.status_code == 200
    response = await server.http.get("/mandates", headers={"Authorization": f"Bearer {token}"})
    assert (response.status_code, response.json()["error"]) == (401, "invalid_token")


BAD_BODIES: list[tuple[str, Any, int, str]] = [
    ("not JSON", b"{", 400, "invalid_request"),
    ("unknown member", {"colour": "red"}, 400, "invalid_request"),
    ("bad LEI", {"grantor_lei": "529900T8BM49AURSDO56"}, 400, "invalid_request"),
    ("unknown client", {"grantee_client_id": "nobody"}, 400, "invalid_request"),
    ("scope outside the client's", {"scopes": ["report:view"]}, 400, "invalid_request"),
    ("no document for a standing instruction", {"document_ref": None}, 400, "invalid_request"),
    ("bad legal basis", {"legal_basis": "handshake"}, 400, "invalid_request"),
    (
        "bad ISIN",
        {"authorization_details": [with_(TRADE, "isins", ["US0378331006"])]},
        400,
        "invalid_authorization_details",
    ),
    (
        "unknown details type",
        {"authorization_details": [{"type": "loan"}]},
        400,
        "invalid_authorization_details",
    ),
    ("already expired", {"effective_until": 1000}, 400, "invalid_request"),
]


@pytest.mark.parametrize(
    ("change", "status", "code"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
async def test_bad_create_bodies(
    server: Server, admin: ClientKit, grantee_id: str, change: Any, status: int, code: str
) -> None:
    headers = {**await bearer(server, admin)}
    if isinstance(change, bytes):
        response = await server.http.post(
            "/mandates", content=change, headers={**headers, "Content-Type": "application/json"}
        )
    else:
        response = await server.http.post(
            "/mandates", json=body(grantee_id, **change), headers=headers
        )
    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    listed = await server.http.get("/mandates", params={"grantee": "nobody"}, headers=headers)
    assert listed.json()["mandates"] == []


async def test_state_and_lookup_errors(server: Server, admin: ClientKit, grantee_id: str) -> None:
    auth = await bearer(server, admin)
    created = await create(server, admin, grantee_id, accepted_by="alice")
    mid = created["id"]
    stale = await server.http.post(
        f"/mandates/{mid}/amend",
        json={"scopes": ["order:cancel"], "expected_version": 7},
        headers=auth,
    )
    assert (stale.status_code, stale.json()["error"]) == (409, "conflict")
    empty = await server.http.post(f"/mandates/{mid}/amend", json={"reason": "x"}, headers=auth)
    assert (empty.status_code, empty.json()["error"]) == (400, "invalid_request")
    await server.http.post(f"/mandates/{mid}/revoke", headers=auth)
    again = await server.http.post(f"/mandates/{mid}/revoke", headers=auth)
    assert (again.status_code, again.json()["error"]) == (409, "invalid_state")
    for path in ("/mandates/mdt_missing", "/mandates/" + "a" * 300):
        missing = await server.http.get(path, headers=auth)
        assert (missing.status_code, missing.json()["error"]) == (404, "not_found"), path
    for path in ("/mandates/%00", "/mandates/mdt_%00/history"):  # a NUL: 400 at the entry
        nul = await server.http.get(path, headers=auth)
        assert (nul.status_code, nul.json()["error"]) == (400, "invalid_request"), path
    nul = await server.http.post("/mandates/%00x/revoke", headers=auth)
    assert (nul.status_code, nul.json()["error"]) == (400, "invalid_request")
    text_body = await server.http.post(
        f"/mandates/{mid}/accept",
        content=b"accepted_by=alice",
        headers={**auth, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (text_body.status_code, text_body.json()["error"]) == (400, "invalid_request")


async def test_metadata_advertises_the_types(server: Server) -> None:
    meta = (await server.http.get("/.well-known/oauth-authorization-server")).json()
    assert meta["authorization_details_types_supported"] == [
        "settlement_instruction",
        "trade_instruction",
    ]


async def test_registration_checks_details_types(server: Server) -> None:
    from trustplane.errors import InvalidClientMetadataError

    with pytest.raises(InvalidClientMetadataError, match="unknown type\\(s\\): loan"):
        await register_kit(server.services, authorization_details_types=["loan"])


async def test_racing_amend_requests_one_wins_the_rest_conflict(
    server: Server, admin: ClientKit, grantee_id: str
) -> None:
    import asyncio

    auth = await bearer(server, admin)
    mid = (await create(server, admin, grantee_id, accepted_by="alice"))["id"]
    scopes = [["order:cancel"], ["order:create", "order:cancel"], ["order:create"]]

    responses = await asyncio.gather(
        *(
            server.http.post(
                f"/mandates/{mid}/amend",
                json={"scopes": scopes[i % 3], "expected_version": 1},
                headers=auth,
            )
            for i in range(6)
        )
    )

    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 409, 409, 409, 409, 409], [r.text for r in responses]
    assert {r.json()["error"] for r in responses if r.status_code == 409} == {"conflict"}
    history = (await server.http.get(f"/mandates/{mid}/history", headers=auth)).json()
    assert [v["version"] for v in history["versions"]] == [1, 2]


JUNK: list[Any] = [
    None,
    0,
    -1,
    2**63,
    1.5,
    True,
    "",
    "x" * 600,
    "\u0000",
    [],
    [{}],
    {},
    {"type": 1},
    ["a"] * 40,
]


async def test_seeded_mutations_never_answer_5xx_nor_write_partially(
    server: Server, admin: ClientKit, grantee_id: str
) -> None:
    """Each mutated body (a member dropped, replaced by junk, or a junk member added) gets a 2xx or
    a 4xx with an error code, never a 5xx; a refused create writes nothing."""
    import random

    rng = random.Random(9396)
    auth = await bearer(server, admin)
    valid = body(grantee_id)
    mid = (await create(server, admin, grantee_id, accepted_by="alice"))["id"]
    before = len(
        (await server.http.get("/mandates", params={"limit": "1000"}, headers=auth)).json()[
            "mandates"
        ]
    )
    created = 0
    for _ in range(120):
        mutated = copy.deepcopy(valid)
        key = rng.choice([*valid, "extra"])
        if rng.random() < 0.3 and key in mutated:
            del mutated[key]
        else:
            mutated[key] = copy.deepcopy(rng.choice(JUNK))
        path = rng.choice(["/mandates", f"/mandates/{mid}/amend"])
        response = await server.http.post(path, json=mutated, headers=auth)
        assert response.status_code < 500, (path, mutated, response.text)
        if response.status_code >= 400:
            assert isinstance(response.json().get("error"), str), response.text
        elif path == "/mandates":
            created += 1
    after = len(
        (await server.http.get("/mandates", params={"limit": "1000"}, headers=auth)).json()[
            "mandates"
        ]
    )
    assert after == before + created
