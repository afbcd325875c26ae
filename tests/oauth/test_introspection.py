"""Token introspection over HTTP (RFC 7662): callers authenticate; anything a caller may not see, and
anything not currently valid, is exactly ``{"active": false}`` (§2.2), so it cannot be used to probe."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
import jwt
import orjson
import pytest
import pytest_asyncio
from sqlalchemy import select, update

from tests.conftest import CLEARING, EXECUTION, LEI, ClientKit, jwks_for, new_ec_key, register_kit
from tests.protocol_server import Server
from trustplane import metrics
from trustplane.clients.model import ClientStatus
from trustplane.clients.tables import clients
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")

INACTIVE = {"active": False}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def other(server: Server) -> ClientKit:
    """Another client, which may introspect no resource (``server.kit`` may introspect EXECUTION)."""
    return await register_kit(server.services, introspection_resources=[])


async def introspect(server: Server, token: str, kit: ClientKit | None = None) -> httpx.Response:
    auth = (kit or server.kit).auth()
    return await server.http.post("/introspect", data={"token": token, **auth})


async def test_own_token_is_active_with_claims(server: Server) -> None:
    token = await server.access_token(scope="order:create order:cancel")
    response = await introspect(server, token)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert body["active"] is True
    assert body["token_type"] == "Bearer"
    for name in ("scope", "client_id", "sub", "aud", "iss", "exp", "iat", "jti"):
        assert body[name] == claims[name], name
    assert body["lei"] == LEI
    assert body["scope"] == "order:create order:cancel"


async def test_token_for_callers_resource_issued_to_another_client_is_active(
    server: Server, other: ClientKit
) -> None:
    token = await server.access_token(other, resource=EXECUTION)
    body = (await introspect(server, token)).json()
    assert body["active"] is True
    assert (body["client_id"], body["aud"]) == (other.client_id, EXECUTION)


# Each case makes a token that the caller (server.kit) must see as exactly {"active": false}.
TokenFactory = Callable[[Server, ClientKit], Awaitable[str]]


async def _others_token_for_resource_caller_may_not_introspect(s: Server, o: ClientKit) -> str:
    return await s.access_token(o, resource=CLEARING, scope="settlement:submit")


async def _expired(s: Server, o: ClientKit) -> str:
    return s.expired_token()


async def _revoked(s: Server, o: ClientKit) -> str:
    token = await s.access_token()
    revoked = await s.http.post("/revoke", data={"token": token, **s.kit.auth()})
    assert revoked.status_code == 200, revoked.text
    return token


async def _garbage(s: Server, o: ClientKit) -> str:
    return "not-a-token"


async def _foreign_signed_with_our_kid(s: Server, o: ClientKit) -> str:
    """A well-formed at+jwt with our kid and plausible claims, signed by a key that is not ours."""
    genuine = await s.access_token()
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False})
    claims["jti"] = uuid.uuid4().hex
    return jwt.encode(
        claims, new_ec_key(), algorithm="ES256", headers={"kid": header["kid"], "typ": "at+jwt"}
    )


async def _unsigned(s: Server, o: ClientKit) -> str:
    genuine = await s.access_token()
    claims = jwt.decode(genuine, options={"verify_signature": False})
    return jwt.encode(claims, None, algorithm="none", headers={"typ": "at+jwt"})


async def _signed_by_us_for_another_issuer(s: Server, o: ClientKit) -> str:
    issued = issue_access_token(
        s.services.keys.ring,
        issuer="https://elsewhere.example",
        subject=s.kit.client_id,
        client_id=s.kit.client_id,
        audience=EXECUTION,
        scopes=("order:create",),
        lifetime=300,
    )
    return issued.token


async def _disabled_clients_token(s: Server, o: ClientKit) -> str:
    """Issued for the caller's resource (so it would be visible), then its client is disabled."""
    kit = await register_kit(s.services)
    token = await s.access_token(kit, resource=EXECUTION)
    assert (await introspect(s, token)).json()["active"] is True
    await s.services.clients.set_status(kit.client_id, ClientStatus.DISABLED)
    return token


def _ours_valid_from(name: str, delay: int) -> TokenFactory:
    """A token we signed for the caller whose ``name`` (``nbf``/``iat``) is ``delay`` s ahead."""

    async def make(s: Server, o: ClientKit) -> str:
        return issue_access_token(
            s.services.keys.ring,
            issuer=s.issuer,
            subject=s.kit.client_id,
            client_id=s.kit.client_id,
            audience=EXECUTION,
            scopes=("order:create",),
            lifetime=7200,
            extra={"lei": LEI, name: int(time.time()) + delay},
        ).token

    return make


async def _callers_refresh_token_lookalike(s: Server, o: ClientKit) -> str:
    """Not a JWT at all: the shape of our refresh tokens (introspected as inactive, see the docs)."""
    return secrets.token_urlsafe(32)


INACTIVE_TOKENS = [
    pytest.param(_ours_valid_from("nbf", 3600), id="nbf-in-the-future"),
    pytest.param(_ours_valid_from("iat", 3600), id="iat-in-the-future"),
    pytest.param(_callers_refresh_token_lookalike, id="opaque-unknown"),
    pytest.param(
        _others_token_for_resource_caller_may_not_introspect, id="other-client-other-resource"
    ),
    pytest.param(_expired, id="expired"),
    pytest.param(_revoked, id="revoked"),
    pytest.param(_garbage, id="garbage"),
    pytest.param(_foreign_signed_with_our_kid, id="foreign-signed-with-our-kid"),
    pytest.param(_unsigned, id="alg-none"),
    pytest.param(_signed_by_us_for_another_issuer, id="another-issuer"),
    pytest.param(_disabled_clients_token, id="disabled-client"),
]


async def test_token_valid_from_within_the_clock_skew_is_active(server: Server) -> None:
    """Another instance whose clock is a few seconds ahead issued it: as the bearer guard, allowed."""
    for name in ("nbf", "iat"):
        token = await _ours_valid_from(name, 5)(server, server.kit)
        assert (await introspect(server, token)).json()["active"] is True, name


@pytest.mark.parametrize("make_token", INACTIVE_TOKENS)
async def test_inactive_token_is_exactly_active_false(
    server: Server, other: ClientKit, make_token: TokenFactory
) -> None:
    token = await make_token(server, other)
    response = await introspect(server, token)
    assert response.status_code == 200, response.text
    assert response.json() == INACTIVE
    assert response.headers["cache-control"] == "no-store"


async def test_other_client_sees_only_its_own_tokens(server: Server, other: ClientKit) -> None:
    """``other`` has no introspection resources: the caller's token is invisible to it."""
    token = await server.access_token()
    assert (await introspect(server, token, other)).json() == INACTIVE
    own = await server.access_token(other, resource=CLEARING, scope="settlement:submit")
    assert (await introspect(server, own, other)).json()["active"] is True


REFUSED_CALLERS = [
    pytest.param(lambda s: {"token": "x"}, 401, "invalid_client", id="no-client-authentication"),
    pytest.param(
        lambda s: {"token": "x", **s.kit.auth(_key=new_ec_key())},
        401,
        "invalid_client",
        id="bad-assertion",
    ),
    pytest.param(
        lambda s: {"token": "x", **s.kit.auth(exp=int(time.time()) - 600)},
        401,
        "invalid_client",
        id="expired-assertion",
    ),
    pytest.param(lambda s: s.kit.auth(), 400, "invalid_request", id="token-parameter-missing"),
]


@pytest.mark.parametrize(("form", "status", "error"), REFUSED_CALLERS)
async def test_refused_introspection_request(
    server: Server, form: Callable[[Server], dict[str, str]], status: int, error: str
) -> None:
    response = await server.http.post("/introspect", data=form(server))
    assert (response.status_code, response.json()["error"]) == (status, error), response.text


# --------------------------------------------------------------------------- who may introspect


async def _registered_over_http(server: Server) -> ClientKit:
    """A client registered by RFC 7591 (initial access token), as anyone holding one may."""
    key = new_ec_key()
    token = await server.services.clients.create_initial_access_token("tests", lei=LEI)
    body = {"lei": LEI, "scope": "order:create", "allowed_resources": [EXECUTION],
            "jwks": jwks_for(key)}  # fmt: skip
    response = await server.http.post(
        "/register", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 201, response.text
    return ClientKit(response.json()["client_id"], key, server.issuer)


async def _store_legacy_introspection(server: Server, client_id: str, *, operator: bool) -> None:
    """Rewrite a stored row as a server before issue 11 wrote it: ``introspection_resources`` in the
    metadata (self-declared by DCR, or set by ``clients add``, which leaves no registration token)."""
    async with server.services.db.transaction() as conn:
        where = clients.c.client_id == client_id
        raw = (await conn.execute(select(clients.c.metadata).where(where))).scalar_one()
        stored = {**orjson.loads(raw), "introspection_resources": [EXECUTION]}
        stored.pop("resource_server_for", None)
        values: dict[str, object] = {"metadata": orjson.dumps(stored).decode()}
        if operator:
            values["registration_token_hash"] = None
        await conn.execute(update(clients).where(where).values(**values))
    await server.services.clients.load()


def _refused_count() -> float:
    sample = metrics.TOKEN_RIGHTS_REFUSED.labels(
        endpoint="introspection", reason="not_resource_server"
    )
    return float(sample._value.get())


async def test_dcr_client_with_stored_introspection_resources_cannot_introspect(
    server: Server, other: ClientKit
) -> None:
    """Issue 11 item 2: a right a client declared for itself before the fix is not honoured. RFC 7662
    §2.2: a caller not allowed to introspect this token gets exactly ``{"active": false}``."""
    dcr = await _registered_over_http(server)
    await _store_legacy_introspection(server, dcr.client_id, operator=False)
    stored = server.services.clients.registry.get(dcr.client_id)
    assert stored is not None
    assert stored.resource_server_for == frozenset()
    assert "introspection_resources" not in stored.metadata
    token = await server.access_token(other, resource=EXECUTION)
    before = _refused_count()

    response = await introspect(server, token, dcr)

    assert response.status_code == 200, response.text
    assert response.json() == INACTIVE
    assert _refused_count() == before + 1
    assert (await introspect(server, token)).json()["active"] is True  # the operator's RS still can


async def test_operator_registered_resource_server_can_introspect(
    server: Server, other: ClientKit
) -> None:
    """``clients add --resource-server`` (and a row ``clients add`` stored before the rename)."""
    rs = await register_kit(
        server.services, resource_server_for=[EXECUTION], introspection_resources=[]
    )
    legacy = await register_kit(server.services, introspection_resources=[])
    await _store_legacy_introspection(server, legacy.client_id, operator=True)
    token = await server.access_token(other, resource=EXECUTION)

    for caller in (rs, legacy):
        body = (await introspect(server, token, caller)).json()
        assert body["active"] is True
        assert (body["client_id"], body["aud"]) == (other.client_id, EXECUTION)
    outside = await server.access_token(other, resource=CLEARING, scope="settlement:submit")
    assert (await introspect(server, outside, rs)).json() == INACTIVE
