"""Who may exchange a token of ours (RFC 8693 §2.1-2.2, §4.4, §5; issue 11 item 1), over HTTP with a
real authorization-code token for Alice resting on her mandate.

Allowed: the token's own client, a client named in ``may_act``, a client the operator made the
resource server for the token's audience; and then only where the PDP finds the exchanging client
related to the mandate's grantee. Everything else is 400 ``invalid_request`` (reason
``not_entitled``) with a deny record in the ledger, however often it is tried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio

from tests.authorize.flow import PASSWORD, Flow
from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key, register_kit
from tests.protocol_server import Server
from trustplane import metrics
from trustplane.audit.sink import recent_events
from trustplane.oauth.exchange import TOKEN_EXCHANGE
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
ALICE_LEI = "529900T8BM49AURSDO55"  # Northwind: the grantor
OTHER_LEI = "213800BROKERCLR10051"  # a legal entity that is not the mandate's grantee
EXCHANGER = {
    "grant_types": ["client_credentials", TOKEN_EXCHANGE],
    "scope": "order:create",
    "allowed_resources": [EXECUTION],
    "authorization_details_types": ["trade_instruction"],
}


@dataclass
class Rights:
    server: Server
    a: ClientKit  # the code client Alice consented to: the mandate's grantee
    alice: dict[str, Any]  # Alice's access token response (authorization code + PKCE + consent)

    @property
    def token(self) -> str:
        return str(self.alice["access_token"])

    async def exchange(self, kit: ClientKit, subject_token: str | None = None) -> tuple[Any, str]:
        auth = kit.auth()
        data = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token or self.token,
            "subject_token_type": ACCESS,
            "resource": EXECUTION,
            "scope": "order:create",
            **auth,
        }
        jti = jwt.decode(auth["client_assertion"], options={"verify_signature": False})["jti"]
        return await self.server.http.post("/token", data=data), jti

    async def refusal(self, client_jti: str) -> dict[str, Any]:
        events = await recent_events(self.server.services.db, 50, "oauth:token:refused")
        (event,) = [e for e in events if e["jti"] == client_jti]
        return event

    async def dcr(self, **metadata: Any) -> tuple[ClientKit, dict[str, Any]]:
        """A client registered by RFC 7591 with an initial access token, as anyone holding one."""
        key = new_ec_key()
        token = await self.server.services.clients.create_initial_access_token("tests", lei=LEI)
        body = {"lei": LEI, "jwks": jwks_for(key), **EXCHANGER, **metadata}
        response = await self.server.http.post(
            "/register", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 201, response.text
        reg = dict(response.json())
        return ClientKit(reg["client_id"], key, self.server.issuer), reg


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


def not_entitled() -> float:
    sample = metrics.TOKEN_RIGHTS_REFUSED.labels(endpoint="token_exchange", reason="not_entitled")
    return float(sample._value.get())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rights(server: Server) -> AsyncIterator[Rights]:
    a = await register_kit(
        server.services,
        client_name="Client A (the arranger's order service)",
        grant_types=["authorization_code", TOKEN_EXCHANGE],
        redirect_uris=["https://client.example/cb"],
        scope="order:create",
        allowed_resources=[EXECUTION],
        authorization_details_types=["trade_instruction"],
        introspection_resources=[],
    )
    await server.services.authorization.users.add("alice", "Alice Trader", ALICE_LEI, PASSWORD)
    transport = server.http._transport
    async with httpx.AsyncClient(transport=transport, base_url=server.issuer) as agent:
        flow = Flow(agent, a.client_id, EXECUTION)
        code = await flow.code("alice")
        response = await server.http.post("/token", data={**flow.redeem_form(code), **a.auth()})
    assert response.status_code == 200, response.text
    alice = dict(response.json())
    assert "mandate" in claims_of(alice["access_token"])
    yield Rights(server, a, alice)


# --------------------------------------------------------------------------- refused: laundering


async def test_the_laundering_repro_is_refused_every_time(rights: Rights) -> None:
    """Issue 11 item 1, exactly: B registers by DCR with the token-exchange grant and
    ``allowed_resources=[EXECUTION]`` and presents A's authorization-code token for Alice."""
    b, _ = await rights.dcr(grant_types=[TOKEN_EXCHANGE])
    before = not_entitled()

    for _ in range(2):  # "again and again": every attempt is refused and recorded
        response, client_jti = await rights.exchange(b)

        assert error_of(response) == (400, "invalid_request"), response.text
        assert "may not exchange the subject_token" in response.json()["error_description"]
        event = await rights.refusal(client_jti)
        assert (event["decision"], event["reason"]) == ("deny", "invalid_request")
        assert event["reason_ids"] == ["not_entitled"]
        assert event["client_id"] == b.client_id
    assert not_entitled() == before + 2


async def test_a_client_credentials_client_of_the_operator_cannot_launder_either(
    rights: Rights,
) -> None:
    """Same class, other registration path: an operator-registered client that may merely CALL the
    audience (``allowed_resources``), without the resource-server role."""
    c = await register_kit(rights.server.services, **EXCHANGER, introspection_resources=[])

    response, client_jti = await rights.exchange(c)

    assert error_of(response) == (400, "invalid_request"), response.text
    assert (await rights.refusal(client_jti))["reason_ids"] == ["not_entitled"]


async def test_rfc7592_put_adding_the_audience_later_does_not_help(rights: Rights) -> None:
    d, reg = await rights.dcr(allowed_resources=["https://clearing.example/api"])
    headers = {"Authorization": f"Bearer {reg['registration_access_token']}"}
    body = {k: reg[k] for k in ("lei", "jwks", "scope", "grant_types")}
    body |= {"client_id": d.client_id, "authorization_details_types": ["trade_instruction"]}

    made_rs = await rights.server.http.put(
        reg["registration_client_uri"],
        json={**body, "allowed_resources": [EXECUTION], "resource_server_for": [EXECUTION]},
        headers=headers,
    )
    assert error_of(made_rs) == (400, "invalid_client_metadata"), made_rs.text
    widened = await rights.server.http.put(
        reg["registration_client_uri"],
        json={**body, "allowed_resources": [EXECUTION]},
        headers=headers,
    )
    assert widened.status_code == 200, widened.text

    response, client_jti = await rights.exchange(d)

    assert error_of(response) == (400, "invalid_request"), response.text
    assert (await rights.refusal(client_jti))["reason_ids"] == ["not_entitled"]


# --------------------------------------------------------------------------- allowed paths


async def test_the_subject_tokens_own_client_exchanges_it(rights: Rights) -> None:
    response, _ = await rights.exchange(rights.a)

    assert response.status_code == 200, response.text
    issued = claims_of(response.json()["access_token"])
    assert (issued["sub"], issued["client_id"]) == (
        claims_of(rights.token)["sub"],
        rights.a.client_id,
    )
    assert issued["mandate"] == claims_of(rights.token)["mandate"]


async def test_a_client_named_in_may_act_exchanges_it(rights: Rights) -> None:
    """RFC 8693 §4.4: the token names who may act; a DCR client of the grantee's entity here."""
    named, _ = await rights.dcr()
    stranger, _ = await rights.dcr()
    alice = claims_of(rights.token)
    subject = issue_access_token(
        rights.server.services.keys.ring,
        issuer=rights.server.issuer,
        subject="alice",
        client_id=rights.a.client_id,
        audience=EXECUTION,
        scopes=("order:create",),
        lifetime=300,
        extra={"lei": alice["lei"], "mandate": alice["mandate"],
               "may_act": {"sub": named.client_id, "iss": rights.server.issuer}},
    ).token  # fmt: skip

    response, _ = await rights.exchange(named, subject)
    refused, client_jti = await rights.exchange(stranger, subject)

    assert response.status_code == 200, response.text
    assert claims_of(response.json()["access_token"])["act"]["sub"] == named.client_id
    assert error_of(refused) == (400, "invalid_request"), refused.text
    assert (await rights.refusal(client_jti))["reason_ids"] == ["not_entitled"]


async def test_an_operator_registered_resource_server_of_the_grantees_entity_exchanges_it(
    rights: Rights,
) -> None:
    rs = await register_kit(rights.server.services, **EXCHANGER, resource_server_for=[EXECUTION])

    response, _ = await rights.exchange(rs)

    assert response.status_code == 200, response.text
    issued = claims_of(response.json()["access_token"])
    assert (issued["sub"], issued["client_id"]) == (claims_of(rights.token)["sub"], rs.client_id)
    assert issued["act"]["sub"] == rs.client_id


# --------------------------------------------------------------------------- the PDP: mandate relation


async def test_a_resource_server_unrelated_to_the_mandates_grantee_is_refused_by_policy(
    rights: Rights,
) -> None:
    """Entitled by the operator (resource server for the audience) but of another legal entity than
    the grantee: the PDP refuses (``exchange.mandate_grantee``) with the mandate in its record."""
    rs = await register_kit(
        rights.server.services, **EXCHANGER, lei=OTHER_LEI, resource_server_for=[EXECUTION]
    )
    mandate_id = claims_of(rights.token)["mandate"]["id"]

    response, client_jti = await rights.exchange(rs)

    assert error_of(response) == (400, "invalid_scope"), response.text
    event = await rights.refusal(client_jti)
    assert "exchange.mandate_grantee" in event["payload"]["detail"]
    denials = await recent_events(rights.server.services.db, 20, "policy:decision:denied")
    (denied,) = [d for d in denials if d["client_id"] == rs.client_id]
    assert denied["reason_ids"] == ["exchange.mandate_grantee"]
    assert denied["mandate_id"] == mandate_id
    assert denied["payload"]["action"] == "token:exchange"
