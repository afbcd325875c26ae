"""The same refusals, the same way, on every bearer-protected route of ours.

One table of cases runs against every guarded API (ledger queries and ingest, mandates, partner admin, policy
simulations, AuthZEN evaluation), on SQLite and PostgreSQL: exact status, exact body, exact
``WWW-Authenticate`` parameters (RFC 6750 §3). The revoked-token case is issue 11 item 5's regression
(the AuthZEN API accepted revoked tokens).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update

from tests.conftest import EXECUTION, LEI, register_kit
from tests.mandates.conftest import grantee, terms
from tests.protocol_server import Server
from trustplane.clients.model import ClientStatus
from trustplane.mandates.tables import mandates as mandate_heads
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class Api:
    name: str
    method: str
    path: str
    audience_path: str
    scope: str
    body: Callable[[Server], Any] | None = None
    label: str = ""  # its ``api`` label in trustplane_bearer_refused_total (default: name)

    def audience(self, server: Server) -> str:
        return server.issuer + self.audience_path


def _evaluation(_server: Server) -> dict[str, Any]:
    le = {"type": "LegalEntity", "id": LEI}
    return {
        "subject": {
            "type": "Client",
            "id": "c-1",
            "properties": {"legal_entity": {"__entity": le}},
        },
        "action": {"name": "order:cancel"},
        "resource": {"type": "Order", "id": "O-1", "properties": {"owner": {"__entity": le}}},
        "context": {"data_region": "eu", "delegation_depth": 0},
    }


APIS = [
    Api("audit", "GET", "/audit/events", "/audit", "audit:query"),
    Api(
        "audit-ingest",
        "POST",
        "/audit/events",
        "/audit",
        "audit:ingest",
        lambda s: {"events": []},
        "audit_ingest",
    ),
    Api("mandates", "GET", "/mandates", "/mandates", "mandate:view"),
    Api("federation", "GET", "/federation/partners", "/federation", "partner:administer"),
    Api(
        "simulations",
        "POST",
        "/access/v1/simulations",
        "/access/v1",
        "policy:simulate",
        lambda s: {"version": s.services.policy.engine.version},
        "policy_simulations",
    ),
    Api("authzen", "POST", "/access/v1/evaluation", "/access/v1", "decision:evaluate", _evaluation),
    Api("ssf", "GET", "/ssf/stream", "/ssf", "ssf:stream"),
]


def mint(server: Server, api: Api, client_id: str | None = None, **claims: Any) -> str:
    """A token signed by the server's own key ring, for ``api`` unless ``claims`` say otherwise."""
    values: dict[str, Any] = {
        "issuer": server.issuer,
        "subject": client_id or server.kit.client_id,
        "client_id": client_id or server.kit.client_id,
        "audience": api.audience(server),
        "scopes": (api.scope,),
        "lifetime": 300,
        "extra": {"lei": LEI},
    }
    values.update(claims)
    return issue_access_token(server.services.keys.ring, **values).token


def signed(server: Server, api: Api, typ: str = "at+jwt", **overrides: Any) -> str:
    """Claims of a valid token for ``api`` with ``overrides``, signed under ``typ``."""
    now = int(time.time())
    claims = {
        "iss": server.issuer,
        "sub": server.kit.client_id,
        "client_id": server.kit.client_id,
        "aud": api.audience(server),
        "exp": now + 300,
        "iat": now,
        "nbf": now,
        "jti": f"jti-{time.monotonic_ns()}",
        "scope": api.scope,
    }
    claims.update(overrides)
    return server.services.keys.ring.require_signer().with_typ(typ).sign(claims)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


Headers = list[tuple[str, str]]
Make = Callable[[Server, Api], Awaitable[Headers]]


async def _none(s: Server, a: Api) -> Headers:
    return []


async def _basic(s: Server, a: Api) -> Headers:
    return [("Authorization", "Basic eDp5")]


async def _not_b64token(s: Server, a: Api) -> Headers:
    return [("Authorization", 'Bearer a"b')]


async def _two_headers(s: Server, a: Api) -> Headers:
    token = mint(s, a)
    return [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]


async def _not_a_jwt(s: Server, a: Api) -> Headers:
    return bearer("not-a-jwt")


async def _bad_signature(s: Server, a: Api) -> Headers:
    head, body, sig = mint(s, a).split(".")
    return bearer(f"{head}.{body}.{sig[:-6]}AAAAAA")


async def _security_event_typ(s: Server, a: Api) -> Headers:
    return bearer(signed(s, a, typ="secevent+jwt"))


async def _plain_jwt_typ(s: Server, a: Api) -> Headers:
    return bearer(signed(s, a, typ="JWT"))


async def _other_issuer(s: Server, a: Api) -> Headers:
    return bearer(mint(s, a, issuer="https://other.example"))


async def _other_audience(s: Server, a: Api) -> Headers:
    return bearer(mint(s, a, audience=EXECUTION))


async def _other_audience_list(s: Server, a: Api) -> Headers:
    return bearer(signed(s, a, aud=[EXECUTION]))


async def _several_audiences(s: Server, a: Api) -> Headers:
    return bearer(signed(s, a, aud=[a.audience(s), EXECUTION]))


async def _expired(s: Server, a: Api) -> Headers:
    return bearer(mint(s, a, lifetime=-120))


async def _not_yet_valid(s: Server, a: Api) -> Headers:
    return bearer(signed(s, a, nbf=int(time.time()) + 3600))


async def _no_jti(s: Server, a: Api) -> Headers:
    return bearer(signed(s, a, jti=""))


async def _missing_scope(s: Server, a: Api) -> Headers:
    return bearer(mint(s, a, scopes=("order:create",)))


async def _revoked(s: Server, a: Api) -> Headers:
    token = mint(s, a)
    revoked = await s.http.post("/revoke", data={"token": token, **s.kit.auth()})
    assert revoked.status_code == 200
    return bearer(token)


async def _disabled_client(s: Server, a: Api) -> Headers:
    kit = await register_kit(s.services)
    token = mint(s, a, client_id=kit.client_id)
    await s.services.clients.set_status(kit.client_id, ClientStatus.DISABLED)
    return bearer(token)


async def _mandate_token(s: Server, a: Api) -> tuple[str, str]:
    """A live mandate and a token of its grantee resting on it: (mandate id, token)."""
    client_id = (await grantee(s.services)).client_id
    created = await s.services.mandates.create(terms(client_id), actor="ops", accepted_by="alice")
    token = mint(s, a, client_id=client_id, extra={"lei": LEI, "mandate": created.ref})
    return created.id, token


async def _mandate_revoked(s: Server, a: Api) -> Headers:
    mandate_id, token = await _mandate_token(s, a)
    await s.services.mandates.revoke(mandate_id, actor="ops", reason="withdrawn")
    return bearer(token)


async def _mandate_expired(s: Server, a: Api) -> Headers:
    mandate_id, token = await _mandate_token(s, a)
    async with s.services.db.transaction() as conn:  # its end passed (no waiting for the clock)
        await conn.execute(
            update(mandate_heads)
            .where(mandate_heads.c.id == mandate_id)
            .values(effective_until=int(time.time()) - 10)
        )
    s.services.mandates.invalidate()
    return bearer(token)


async def _mandate_unknown(s: Server, a: Api) -> Headers:
    ref = {"id": "m-does-not-exist", "version": 1}
    return bearer(mint(s, a, extra={"lei": LEI, "mandate": ref}))


async def _mandate_malformed(s: Server, a: Api) -> Headers:
    return bearer(mint(s, a, extra={"lei": LEI, "mandate": "m-1"}))  # not {"id", "version"}


async def _valid(s: Server, a: Api) -> Headers:
    return bearer(mint(s, a))


async def _valid_audience_list(s: Server, a: Api) -> Headers:
    return bearer(signed(s, a, aud=[a.audience(s)]))


async def _valid_mandate(s: Server, a: Api) -> Headers:
    return bearer((await _mandate_token(s, a))[1])


MISSING = "a bearer access token is required"
#: (id, make the request's headers, status, error, error_description ({audience}, {scope}), query)
CASES: list[tuple[str, Make, int, str | None, str]] = [
    ("no-token", _none, 401, "invalid_token", MISSING),
    ("basic-scheme", _basic, 401, "invalid_token", MISSING),
    (
        "malformed-header",
        _not_b64token,
        400,
        "invalid_request",
        "malformed bearer token in the Authorization header",
    ),
    ("two-headers", _two_headers, 400, "invalid_request", "more than one Authorization header"),
    ("not-a-jwt", _not_a_jwt, 401, "invalid_token", "the access token is malformed"),
    (
        "bad-signature",
        _bad_signature,
        401,
        "invalid_token",
        "the access token's signature does not verify",
    ),
    (
        "typ-secevent",
        _security_event_typ,
        401,
        "invalid_token",
        "the token is not an access token (typ)",
    ),
    ("typ-jwt", _plain_jwt_typ, 401, "invalid_token", "the token is not an access token (typ)"),
    (
        "other-issuer",
        _other_issuer,
        401,
        "invalid_token",
        "the access token is from another issuer",
    ),
    (
        "other-audience",
        _other_audience,
        401,
        "invalid_token",
        "the access token is not meant (only) for {audience}",
    ),
    (
        "other-audience-list",
        _other_audience_list,
        401,
        "invalid_token",
        "the access token is not meant (only) for {audience}",
    ),
    (
        "several-audiences",
        _several_audiences,
        401,
        "invalid_token",
        "the access token is not meant (only) for {audience}",
    ),
    ("expired", _expired, 401, "invalid_token", "the access token has expired"),
    ("not-yet-valid", _not_yet_valid, 401, "invalid_token", "the access token is not valid yet"),
    ("empty-jti", _no_jti, 401, "invalid_token", "the access token's claims are malformed"),
    (
        "missing-scope",
        _missing_scope,
        403,
        "insufficient_scope",
        "the access token lacks the scope {scope}",
    ),
    ("revoked", _revoked, 401, "invalid_token", "the access token is revoked"),
    (
        "disabled-client",
        _disabled_client,
        401,
        "invalid_token",
        "the access token's client is not active",
    ),
    (
        "mandate-revoked",
        _mandate_revoked,
        401,
        "invalid_token",
        "the mandate the access token rests on is no longer usable",
    ),
    (
        "mandate-expired",
        _mandate_expired,
        401,
        "invalid_token",
        "the mandate the access token rests on is no longer usable",
    ),
    (
        "mandate-malformed",
        _mandate_malformed,
        401,
        "invalid_token",
        "the mandate the access token rests on is no longer usable",
    ),
    (
        "mandate-unknown",
        _mandate_unknown,
        401,
        "invalid_token",
        "the mandate the access token rests on is no longer usable",
    ),
]
ALLOWED: list[tuple[str, Make]] = [
    ("valid", _valid),
    ("valid-audience-list", _valid_audience_list),
    ("valid-mandate", _valid_mandate),
]


async def call(server: Server, api: Api, headers: Headers, query: str = "") -> httpx.Response:
    body = api.body(server) if api.body else None
    return await server.http.request(
        api.method, api.path + query, json=body, headers=httpx.Headers(headers)
    )


def challenge(response: httpx.Response) -> dict[str, str]:
    value = response.headers["www-authenticate"]
    assert value.startswith("Bearer "), value
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


@pytest.mark.parametrize("api", APIS, ids=[a.name for a in APIS])
@pytest.mark.parametrize(
    ("make", "status", "error", "description"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_refused_the_same_way_everywhere(
    server: Server, api: Api, make: Make, status: int, error: str, description: str
) -> None:
    text = description.format(audience=api.audience(server), scope=api.scope)
    labels = {"api": api.label or api.name, "error": error}
    before = _refusals(labels)

    response = await call(server, api, await make(server, api))

    assert response.status_code == status, response.text
    assert response.json() == {"error": error, "error_description": text}
    assert response.headers["cache-control"] == "no-store"
    expected = {"realm": "trustplane"}
    if text != MISSING:  # RFC 6750 §3.1: no error information when no credentials were sent
        expected |= {"error": error, "error_description": text}
    if error == "insufficient_scope":
        expected["scope"] = api.scope
    assert challenge(response) == expected
    assert _refusals(labels) == before + 1


def _refusals(labels: dict[str, str]) -> float:
    """``trustplane_bearer_refused_total`` summed over reasons."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "trustplane_bearer_refused"
        for sample in metric.samples
        if sample.name.endswith("_total") and labels.items() <= sample.labels.items()
    )


@pytest.mark.parametrize("api", APIS, ids=[a.name for a in APIS])
async def test_a_token_in_the_query_string_is_invalid_request(server: Server, api: Api) -> None:
    response = await call(server, api, [], f"?access_token={mint(server, api)}")

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert challenge(response)["error"] == "invalid_request"


@pytest.mark.parametrize("api", APIS, ids=[a.name for a in APIS])
@pytest.mark.parametrize("make", [c[1] for c in ALLOWED], ids=[c[0] for c in ALLOWED])
async def test_a_live_token_for_the_api_passes(server: Server, api: Api, make: Make) -> None:
    response = await call(server, api, await make(server, api))

    assert response.status_code == 200, response.text
    assert "www-authenticate" not in response.headers


@pytest.mark.parametrize("api", APIS, ids=[a.name for a in APIS])
async def test_revocation_ends_a_token_that_was_accepted(server: Server, api: Api) -> None:
    """The signature cache (a PEP reuses its token) must not outlive the revocation."""
    token = mint(server, api)
    assert (await call(server, api, bearer(token))).status_code == 200

    revoked = await server.http.post("/revoke", data={"token": token, **server.kit.auth()})
    response = await call(server, api, bearer(token))

    assert revoked.status_code == 200
    assert (response.status_code, response.json()["error"]) == (401, "invalid_token")
    assert response.json()["error_description"] == "the access token is revoked"
