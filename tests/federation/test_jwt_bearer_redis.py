"""With the Redis replay cache, partner assertion jtis are consumed in Redis (SET NX) before the
token is signed: a replay is still invalid_grant with a deny record, and never collides with a
client assertion's jti."""

from __future__ import annotations

import jwt
import pytest

from tests.conftest import EXECUTION, REDIS_URL, register_kit, require_service
from tests.dpop.conftest import ProofKey
from tests.federation.partners import JWT_BEARER, Partner, client_metadata
from tests.protocol_server import running_server
from trustplane.audit.sink import recent_events

pytestmark = pytest.mark.redis


async def test_replayed_partner_assertion_with_redis(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    require_service("Redis", "127.0.0.1", 6379)
    async with running_server(
        request, tmp_path_factory, database="sqlite", redis_url=REDIS_URL
    ) as server:
        svc = server.services
        partner = Partner("partner-r", "https://idp.redis-partner.example", server.issuer)
        await svc.federation.add(partner.profile(), changed_by="test")
        kit = await register_kit(svc, **client_metadata())
        assertion = partner.assertion()
        statuses, refused_jti = [], ""
        for _ in range(2):
            auth = kit.auth()
            refused_jti = jwt.decode(auth["client_assertion"], options={"verify_signature": False})[
                "jti"
            ]
            form = {
                "grant_type": JWT_BEARER,
                "assertion": assertion,
                "scope": "order:create",
                "resource": EXECUTION,
                **auth,
            }
            response = await server.http.post("/token", data=form)
            statuses.append((response.status_code, response.json().get("error")))

        assert statuses == [(200, None), (400, "invalid_grant")]
        refused = await recent_events(svc.db, 5, "oauth:token:refused")
        (event,) = [e for e in refused if e["jti"] == refused_jti]
        assert (event["reason_ids"], event["partner"]) == (["replay"], "partner-r")


async def test_a_refusal_for_a_missing_proof_keeps_the_assertion_with_redis(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Redis consumes a jti at once, not with the outcome: the profile's token_binding is checked
    before, so the refused assertion is still accepted with a proof."""
    require_service("Redis", "127.0.0.1", 6379)
    async with running_server(
        request, tmp_path_factory, database="sqlite", redis_url=REDIS_URL
    ) as server:
        svc = server.services
        partner = Partner("partner-rb", "https://idp.redis-binding.example", server.issuer)
        await svc.federation.add(partner.profile(token_binding=None), changed_by="test")
        kit = await register_kit(svc, **client_metadata())
        assertion = partner.assertion()
        key = ProofKey.generate()
        answers = []
        for headers in ({}, {"DPoP": key.proof(htu=server.issuer + "/token")}):
            form = {
                "grant_type": JWT_BEARER,
                "assertion": assertion,
                "scope": "order:create",
                "resource": EXECUTION,
                **kit.auth(),
            }
            response = await server.http.post("/token", data=form, headers=headers)
            body = response.json()
            answers.append((response.status_code, body.get("token_type"), body.get("error")))
        assert answers == [(400, None, "invalid_request"), (200, "DPoP", None)]
