"""The trust profile's ``token_binding`` (BRIEF, trust boundaries: partner integrations default to
sender-constrained tokens; a bearer token is the exception a profile must allow), over HTTP, for both
grants that issue on a partner's token: jwt-bearer (RFC 7523) and token exchange (RFC 8693).

A refusal comes before the partner assertion's ``jti`` is used: the same assertion is then accepted
with a proof. The ``cnf.jkt`` of a bound token is checked against joserfc's RFC 7638 thumbprint of the
proof key, not ours."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from joserfc.jwk import ECKey

from tests.conftest import EXECUTION, PROTOCOL_DATABASES, ClientKit, register_kit
from tests.dpop.conftest import ProofKey, ath_of
from tests.federation.partners import JWT_BEARER, TOKEN_TYPE_JWT, Partner, client_metadata
from tests.oauth.test_token_binding import resource_server
from tests.protocol_server import Server, running_server
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.oauth.exchange import TOKEN_EXCHANGE

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: partner id -> its profile's token_binding (None: the member left out, the default)
BINDINGS: dict[str, str | None] = {
    "p-default": None,
    "p-dpop": "dpop",
    "p-mtls": "mtls",
    "p-bearer": "bearer",
}


@dataclass
class Bindings:
    server: Server
    kit: ClientKit
    partners: dict[str, Partner]

    async def post(self, form: dict[str, str], key: ProofKey | None = None) -> httpx.Response:
        headers = {} if key is None else {"DPoP": key.proof(htu=self.server.issuer + "/token")}
        data = {"resource": EXECUTION, "scope": "order:create", **form, **self.kit.auth()}
        return await self.server.http.post("/token", data=data, headers=headers)

    async def jwt_bearer(self, assertion: str, key: ProofKey | None = None) -> httpx.Response:
        return await self.post({"grant_type": JWT_BEARER, "assertion": assertion}, key)

    async def exchange(self, assertion: str, key: ProofKey | None = None) -> httpx.Response:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": assertion,
            "subject_token_type": TOKEN_TYPE_JWT,
        }
        return await self.post(form, key)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROTOCOL_DATABASES)
async def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Bindings]:
    async with running_server(request, tmp_path_factory) as server:
        svc = server.services
        svc.federation.registry.remote_jwks = RemoteJwksCache(
            transport=httpx.MockTransport(lambda _r: httpx.Response(404))
        )
        partners = {}
        for pid, binding in BINDINGS.items():
            partner = Partner(pid, f"https://idp.{pid}.example", server.issuer)
            await svc.federation.add(partner.profile(token_binding=binding), changed_by="test")
            partners[pid] = partner
        kit = await register_kit(
            svc, **client_metadata(grant_types=["client_credentials", JWT_BEARER, TOKEN_EXCHANGE])
        )
        yield Bindings(server, kit, partners)


def refusal(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


def claims(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    decoded: dict[str, Any] = jwt.decode(
        response.json()["access_token"], options={"verify_signature": False}
    )
    return decoded


def joserfc_jkt(key: ProofKey) -> str:
    """RFC 7638 thumbprint of the proof key, computed by joserfc (independent of our code)."""
    return str(ECKey.import_key(key.jwk).thumbprint())


@pytest.mark.parametrize("grant", ["jwt_bearer", "exchange"])
async def test_default_profile_refuses_without_proof_and_keeps_the_assertion(
    env: Bindings, grant: str
) -> None:
    send = getattr(env, grant)
    assertion = env.partners["p-default"].assertion()
    assert refusal(await send(assertion)) == (400, "invalid_request")
    # the refusal did not use the assertion's jti: the same assertion, now with a proof, is accepted
    key = ProofKey.generate()
    bound = await send(assertion, key)
    assert bound.json()["token_type"] == "DPoP"
    assert claims(bound)["cnf"] == {"jkt": joserfc_jkt(key)}
    # and it is single-use as before: a second use is a replay
    assert refusal(await send(assertion, ProofKey.generate()))[0] == 400


async def test_default_profile_refusal_says_why(env: Bindings) -> None:
    body = (await env.jwt_bearer(env.partners["p-default"].assertion())).json()
    assert "sender-constrained" in body["error_description"]


async def test_a_dpop_bound_partner_token_is_refused_as_bearer_by_a_resource_server(
    env: Bindings,
) -> None:
    key = ProofKey.generate()
    token = (await env.jwt_bearer(env.partners["p-default"].assertion(), key)).json()
    access = token["access_token"]
    rs_url = "https://rs.example"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=resource_server(env.server)), base_url=rs_url
    ) as rs:
        as_bearer = await rs.get("/orders/1", headers={"Authorization": f"Bearer {access}"})
        assert refusal(as_bearer) == (401, "invalid_token")
        proof = key.proof(htm="GET", htu=f"{rs_url}/orders/1", ath=ath_of(access))
        ok = await rs.get("/orders/1", headers={"Authorization": f"DPoP {access}", "DPoP": proof})
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("grant", ["jwt_bearer", "exchange"])
async def test_dpop_profile_refuses_without_proof_as_invalid_dpop_proof(
    env: Bindings, grant: str
) -> None:
    send = getattr(env, grant)
    assertion = env.partners["p-dpop"].assertion()
    assert refusal(await send(assertion)) == (400, "invalid_dpop_proof")
    key = ProofKey.generate()
    assert claims(await send(assertion, key))["cnf"] == {"jkt": joserfc_jkt(key)}


@pytest.mark.parametrize("grant", ["jwt_bearer", "exchange"])
async def test_mtls_profile_refuses_a_dpop_only_request(env: Bindings, grant: str) -> None:
    send = getattr(env, grant)
    assertion = env.partners["p-mtls"].assertion()
    assert refusal(await send(assertion, ProofKey.generate())) == (400, "invalid_request")
    assert refusal(await send(assertion)) == (400, "invalid_request")


@pytest.mark.parametrize("grant", ["jwt_bearer", "exchange"])
async def test_bearer_profile_issues_a_plain_token(env: Bindings, grant: str) -> None:
    response = await getattr(env, grant)(env.partners["p-bearer"].assertion())
    assert response.json()["token_type"] == "Bearer"
    assert "cnf" not in claims(response)


async def test_bearer_profile_still_binds_a_token_asked_with_a_proof(env: Bindings) -> None:
    key = ProofKey.generate()
    response = await env.jwt_bearer(env.partners["p-bearer"].assertion(), key)
    assert (response.json()["token_type"], claims(response)["cnf"]) == ("DPoP", {"jkt": key.jkt})
