"""Every grant binds what it issues (RFC 9449 §5, issue 13 item 7): jwt-bearer and token exchange
tokens are bound to the DPoP key of the client that asked, over HTTP; a DPoP-bound exchanged token
is refused as a bearer token by a PEP-protected resource server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio

from tests.conftest import EXECUTION, PROTOCOL_DATABASES, ClientKit, register_kit
from tests.dpop.conftest import ProofKey, ath_of
from tests.federation.partners import JWT_BEARER, TOKEN_TYPE_JWT, Partner, client_metadata
from tests.oauth.test_token_binding import resource_server
from tests.protocol_server import Server, running_server
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.oauth.exchange import TOKEN_EXCHANGE

pytestmark = pytest.mark.asyncio(loop_scope="module")
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


@dataclass
class Grants:
    server: Server
    kit: ClientKit
    partner: Partner

    def dpop(self, key: ProofKey) -> dict[str, str]:
        return {"DPoP": key.proof(htu=self.server.issuer + "/token")}

    async def post(self, form: dict[str, str], headers: dict[str, str] | None) -> httpx.Response:
        data = {"resource": EXECUTION, "scope": "order:create", **form, **self.kit.auth()}
        return await self.server.http.post("/token", data=data, headers=headers)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROTOCOL_DATABASES)
async def grants(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Grants]:
    async with running_server(request, tmp_path_factory) as server:
        svc = server.services
        svc.federation.registry.remote_jwks = RemoteJwksCache(
            transport=httpx.MockTransport(lambda _r: httpx.Response(404))
        )
        partner = Partner("partner-a", "https://idp.partner-a.example", server.issuer)
        profile = partner.profile(accepted_token_types=[TOKEN_TYPE_JWT, ACCESS])
        await svc.federation.add(profile, changed_by="test")
        kit = await register_kit(
            svc, **client_metadata(grant_types=["client_credentials", JWT_BEARER, TOKEN_EXCHANGE])
        )
        yield Grants(server, kit, partner)


def cnf_of(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP"
    return jwt.decode(body["access_token"], options={"verify_signature": False})["cnf"]


async def test_jwt_bearer_token_is_bound_to_the_asking_clients_key(grants: Grants) -> None:
    key = ProofKey.generate()
    form = {"grant_type": JWT_BEARER, "assertion": grants.partner.assertion()}
    assert cnf_of(await grants.post(form, grants.dpop(key))) == {"jkt": key.jkt}


async def test_exchanged_token_is_bound_and_refused_as_bearer(grants: Grants) -> None:
    # the subject token: a bearer token of the client (client_credentials)
    subject = await grants.post({"grant_type": "client_credentials"}, None)
    assert subject.json()["token_type"] == "Bearer"
    key = ProofKey.generate()
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject.json()["access_token"],
        "subject_token_type": ACCESS,
    }
    exchanged = await grants.post(form, grants.dpop(key))
    assert cnf_of(exchanged) == {"jkt": key.jkt}
    # RFC 8693 §2.2.1 token_type, RFC 9449 §5: a bound token says so
    assert (exchanged.json()["token_type"], exchanged.json()["issued_token_type"]) == (
        "DPoP",
        ACCESS,
    )
    token = exchanged.json()["access_token"]

    rs_url = "https://rs.example"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=resource_server(grants.server)), base_url=rs_url
    ) as rs:
        as_bearer = await rs.get("/orders/1", headers={"Authorization": f"Bearer {token}"})
        assert (as_bearer.status_code, as_bearer.json()["error"]) == (401, "invalid_token")
        proof = key.proof(htm="GET", htu=f"{rs_url}/orders/1", ath=ath_of(token))
        ok = await rs.get("/orders/1", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
        assert ok.status_code == 200, ok.text
