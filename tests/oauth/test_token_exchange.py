"""RFC 8693 token exchange over HTTP: the issued token (act, prv, txn, mandate, lifetime), and one case
per refusal with the exact status and error code AND the deny record in the audit ledger."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import jwt
import orjson
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from tests.conftest import CLEARING, EXECUTION, LEI, PROTOCOL_DATABASES, ClientKit, register_kit
from tests.federation.partners import TOKEN_TYPE_JWT, Partner
from tests.mandates.conftest import DETAILS_TYPES, terms
from tests.protocol_server import Server, running_server
from tests.rar.test_registry import TRADE
from trustplane.audit.sink import recent_events
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.errors import InvalidRequestError
from trustplane.jose.jws import ParsedJWS
from trustplane.oauth.exchange import TOKEN_EXCHANGE
from trustplane.oauth.exchange.grant import TokenExchangeGrant
from trustplane.oauth.exchange.subject import SubjectTokens
from trustplane.policy.bundle import BundleSource, default_bundle
from trustplane.protocol.tokens import issue_access_token

pytestmark = pytest.mark.asyncio(loop_scope="module")
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
REPORTING = "https://reporting.example/api"


@dataclass
class Exchange:
    server: Server
    kit: ClientKit  # the exchanging client
    a: Partner
    b: Partner
    outbound: list[httpx.Request]

    async def post(
        self, subject_token: str | None, kit: ClientKit | None = None, **form: Any
    ) -> Any:
        """POST /token with the token-exchange grant; returns (response, client assertion jti)."""
        auth = (kit or self.kit).auth()
        jti = jwt.decode(auth["client_assertion"], options={"verify_signature": False})["jti"]
        data = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS,
            "resource": EXECUTION,
            "scope": "order:create",
            **auth,
            **form,
        }
        data = {k: v for k, v in data.items() if v is not None}
        return await self.server.http.post("/token", data=data), jti

    async def refusal(self, client_jti: str) -> dict[str, Any]:
        """The ledger's deny entry for the refused request (matched by its client assertion jti)."""
        events = await recent_events(self.server.services.db, 50, "oauth:token:refused")
        (event,) = [e for e in events if e["jti"] == client_jti]
        assert event["decision"] == "deny"
        return event

    def own(self, lifetime: int = 300, **extra: Any) -> str:
        """One of our access tokens for the exchanging client (as the code flow would issue)."""
        return issue_access_token(
            self.server.services.keys.ring,
            issuer=self.server.issuer,
            subject="alice",
            client_id=self.kit.client_id,
            audience=extra.pop("aud", EXECUTION),
            scopes=tuple(extra.pop("scopes", ("order:create", "order:cancel"))),
            lifetime=lifetime,
            extra={"lei": LEI, **extra},
        ).token

    def partner_access(self, partner: Partner, **overrides: Any) -> str:
        claims: dict[str, Any] = {"aud": EXECUTION, "scope": "order:create", **overrides}
        claims["_headers"] = {"typ": "at+jwt", **overrides.get("_headers", {})}
        return partner.assertion(**claims)


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROTOCOL_DATABASES)
async def ex(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Exchange]:
    async with running_server(request, tmp_path_factory) as server:
        svc, issuer = server.services, server.issuer
        outbound: list[httpx.Request] = []

        def recorded(req: httpx.Request) -> httpx.Response:
            outbound.append(req)
            return httpx.Response(404)

        svc.federation.registry.remote_jwks = RemoteJwksCache(
            transport=httpx.MockTransport(recorded)
        )
        a = Partner("partner-a", "https://idp.partner-a.example", issuer)
        b = Partner("partner-b", "https://idp.partner-b.example", issuer)
        both = [TOKEN_TYPE_JWT, ACCESS]
        for p in (a, b):
            await svc.federation.add(p.profile(accepted_token_types=both), changed_by="test")
        kit = await register_kit(
            svc,
            grant_types=["client_credentials", TOKEN_EXCHANGE],
            authorization_details_types=DETAILS_TYPES,
        )
        yield Exchange(server, kit, a, b, outbound)


# --------------------------------------------------------------------------- success


async def test_exchange_of_our_token_narrows_and_records_the_chain(ex: Exchange) -> None:
    subject = ex.own(txn="txn-42")
    response, _ = await ex.post(subject)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == ACCESS  # RFC 8693 §2.2.1: REQUIRED
    assert (body["token_type"], body["scope"]) == ("Bearer", "order:create")
    assert "refresh_token" not in body  # §2.2.1 OPTIONAL: never issued by an exchange
    jwks = jwt.PyJWKSet.from_dict((await ex.server.http.get("/jwks")).json())
    header = jwt.get_unverified_header(body["access_token"])
    issued = jwt.decode(
        body["access_token"], jwks[header["kid"]], algorithms=[header["alg"]], audience=EXECUTION
    )
    original = claims_of(subject)
    assert header["typ"] == "at+jwt"
    assert issued["sub"] == "alice"
    assert issued["client_id"] == ex.kit.client_id
    assert issued["act"] == {
        "sub": ex.kit.client_id,
        "iss": ex.server.issuer,
        "client_id": ex.kit.client_id,
    }
    assert issued["prv"] == {"iss": ex.server.issuer, "jti": original["jti"]}
    assert issued["txn"] == "txn-42"
    assert issued["exp"] <= original["exp"]

    events = await recent_events(ex.server.services.db, 5, "oauth:token:issued")
    (event,) = [e for e in events if e["jti"] == issued["jti"]]
    assert event["transaction_id"] == "txn-42"
    assert event["actor_chain"] == [ex.kit.client_id]
    assert event["payload"]["grant_type"] == TOKEN_EXCHANGE
    assert event["payload"]["exchange"]["subject_token"] == {
        "iss": ex.server.issuer,
        "jti": original["jti"],
    }
    assert event["payload"]["exchange"]["derived_token"] == {
        "iss": ex.server.issuer,
        "jti": issued["jti"],
    }
    decisions = await recent_events(ex.server.services.db, 10, "policy:decision:allowed")
    (decision,) = [d for d in decisions if d["transaction_id"] == "txn-42"]
    assert decision["payload"]["action"] == "token:exchange"
    assert decision["reason_ids"] == ["exchange.registered_scope"]


async def test_second_hop_nests_act_and_prv(ex: Exchange) -> None:
    first, _ = await ex.post(ex.own(txn="txn-nest"))
    hop1 = first.json()["access_token"]
    second, _ = await ex.post(hop1)

    assert second.status_code == 200, second.text
    hop2 = claims_of(second.json()["access_token"])
    assert hop2["act"]["act"] == claims_of(hop1)["act"]
    assert hop2["prv"]["jti"] == claims_of(hop1)["jti"]
    assert hop2["prv"]["prv"] == claims_of(hop1)["prv"]
    assert hop2["txn"] == "txn-nest"
    events = await recent_events(ex.server.services.db, 5, "oauth:token:issued")
    (event,) = [e for e in events if e["jti"] == hop2["jti"]]
    assert event["actor_chain"] == [ex.kit.client_id, ex.kit.client_id]


async def test_third_hop_is_refused_by_policy_delegation_depth(ex: Exchange) -> None:
    token = ex.own()
    for _ in range(2):
        response, _ = await ex.post(token)
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
    response, client_jti = await ex.post(token)

    assert error_of(response) == (400, "invalid_scope")
    event = await ex.refusal(client_jti)
    assert event["reason"] == "invalid_scope"
    assert "exchange.delegation_depth" in event["payload"]["detail"]


async def test_a_txn_is_minted_when_the_subject_token_has_none(ex: Exchange) -> None:
    response, _ = await ex.post(ex.own())
    assert response.status_code == 200, response.text
    assert len(claims_of(response.json()["access_token"])["txn"]) >= 16


async def test_partner_access_token_keeps_its_origin(ex: Exchange) -> None:
    subject = ex.partner_access(ex.a, txn="txn-p", act={"sub": "arr-oms", "iss": ex.a.issuer})
    response, _ = await ex.post(subject)

    assert response.status_code == 200, response.text
    issued = claims_of(response.json()["access_token"])
    original = claims_of(subject)
    assert issued["sub"] == "partner:partner-a:trader-42"
    assert issued["origin"] == {"iss": ex.a.issuer, "sub": "trader-42"}
    assert issued["partner"] == "partner-a"
    assert issued["act"]["act"] == {"sub": "arr-oms", "iss": ex.a.issuer}
    assert issued["prv"] == {"iss": ex.a.issuer, "jti": original["jti"]}
    assert issued["txn"] == "txn-p"
    assert issued["exp"] <= original["exp"]


async def test_partner_assertion_as_jwt_subject_token(ex: Exchange) -> None:
    response, _ = await ex.post(ex.a.assertion(), subject_token_type=TOKEN_TYPE_JWT)
    assert response.status_code == 200, response.text
    assert claims_of(response.json()["access_token"])["sub"] == "partner:partner-a:trader-42"


async def test_actor_named_in_may_act_is_accepted(ex: Exchange) -> None:
    may_act = {"sub": ex.kit.client_id, "iss": ex.server.issuer}
    response, _ = await ex.post(ex.partner_access(ex.a, may_act=may_act))
    assert response.status_code == 200, response.text


async def test_actor_token_of_the_client_names_the_actor(ex: Exchange) -> None:
    actor = await ex.server.access_token(ex.kit)
    response, _ = await ex.post(ex.own(), actor_token=actor, actor_token_type=ACCESS)
    assert response.status_code == 200, response.text
    act = claims_of(response.json()["access_token"])["act"]
    assert act == {"sub": ex.kit.client_id, "iss": ex.server.issuer, "client_id": ex.kit.client_id}


async def test_narrowed_authorization_details_are_issued(ex: Exchange) -> None:
    narrow = {**TRADE, "accounts": ["ACC-1"], "isins": ["US0378331005"]}
    response, _ = await ex.post(
        ex.own(authorization_details=[TRADE]), authorization_details=orjson.dumps([narrow]).decode()
    )
    assert response.status_code == 200, response.text
    assert claims_of(response.json()["access_token"])["authorization_details"] == [narrow]


async def test_mandate_is_kept_and_rechecked(ex: Exchange) -> None:
    mandate = await ex.server.services.mandates.create(
        terms(ex.kit.client_id), actor="test", accepted_by="alice"
    )
    ref = {"id": mandate.id, "version": mandate.version}
    subject = ex.own(mandate=ref)
    ok, _ = await ex.post(subject)
    assert ok.status_code == 200, ok.text
    assert claims_of(ok.json()["access_token"])["mandate"] == ref
    events = await recent_events(ex.server.services.db, 5, "oauth:token:issued")
    assert events[0]["mandate_id"] == mandate.id

    await ex.server.services.mandates.revoke(mandate.id, actor="alice", reason="test")
    refused, client_jti = await ex.post(subject)
    assert error_of(refused) == (400, "invalid_request")
    assert (await ex.refusal(client_jti))["reason_ids"] == ["mandate_revoked"]


async def test_lifetime_never_outlives_the_subject_token(ex: Exchange) -> None:
    subject = ex.own(lifetime=45)
    response, _ = await ex.post(subject)
    assert response.status_code == 200, response.text
    issued = claims_of(response.json()["access_token"])
    assert issued["exp"] <= claims_of(subject)["exp"]
    assert response.json()["expires_in"] <= 45


# --------------------------------------------------------------------------- refusals


def _expired(ex: Exchange) -> str:
    return ex.own(lifetime=-10)


def _partner_expired_within_skew(ex: Exchange) -> str:
    """Past its exp but within the clock skew the registry grants partners: nothing left to issue."""
    now = int(time.time())
    return ex.partner_access(ex.a, iat=now - 100, exp=now - 5)


CASES: dict[str, tuple[Any, dict[str, Any], int, str, str | None]] = {
    # name: (subject token maker, extra form, status, error, reason_id)
    "untrusted issuer": (
        lambda ex: ex.partner_access(ex.a, iss="https://idp.stranger.example"),
        {}, 400, "invalid_request", "untrusted_issuer",
    ),
    "partner A's key with partner B's iss": (
        lambda ex: ex.partner_access(ex.a, iss=ex.b.issuer),
        {}, 400, "invalid_request", "signature",
    ),
    "widened scope": (lambda ex: ex.own(scopes=("order:cancel",)), {}, 400, "invalid_scope", None),
    "audience the client may not target": (
        lambda ex: ex.own(), {"resource": REPORTING, "scope": None}, 400, "invalid_target", None,
    ),
    "audience the subject's scopes do not reach": (
        lambda ex: ex.own(), {"resource": CLEARING, "scope": "settlement:submit"},
        400, "invalid_target", None,
    ),
    "expired subject token": (_expired, {}, 400, "invalid_request", "expired"),
    "partner token past exp (within the skew)": (
        _partner_expired_within_skew, {}, 400, "invalid_request", "expired",
    ),
    "subject token for another audience": (
        lambda ex: ex.own(aud="https://elsewhere.example/api"),
        {}, 400, "invalid_request", "audience",
    ),
    "partner token for another audience": (
        lambda ex: ex.partner_access(ex.a, aud="https://elsewhere.example/api"),
        {}, 400, "invalid_request", "audience",
    ),
    "an id_token type": (
        lambda ex: ex.own(), {"subject_token_type": "urn:ietf:params:oauth:token-type:id_token"},
        400, "invalid_request", "token_type",
    ),
    "a refresh_token type": (
        lambda ex: ex.own(),
        {"subject_token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
        400, "invalid_request", "token_type",
    ),
    "an ID-token-shaped JWT as access_token": (
        lambda ex: ex.a.assertion(_headers={"typ": "JWT"}), {}, 400, "invalid_request", "token_type",
    ),
    "a client assertion as access_token": (
        lambda ex: ex.kit.assertion(), {}, 400, "invalid_request", "token_type",
    ),
    "a logout token as access_token": (
        lambda ex: ex.a.assertion(_headers={"typ": "logout+jwt"}),
        {}, 400, "invalid_request", "token_type",
    ),
    "our access token declared as jwt": (
        lambda ex: ex.own(), {"subject_token_type": TOKEN_TYPE_JWT},
        400, "invalid_request", "token_type",
    ),
    "actor not in may_act": (
        lambda ex: ex.partner_access(ex.a, may_act={"sub": "somebody-else"}),
        {}, 400, "invalid_request", "may_act",
    ),
    "not a JWT": (lambda ex: "not-a-jwt", {}, 400, "invalid_request", "malformed"),
    "missing subject_token_type": (
        lambda ex: ex.own(), {"subject_token_type": None}, 400, "invalid_request", None,
    ),
    "missing subject_token": (lambda ex: None, {}, 400, "invalid_request", None),
    "actor_token without actor_token_type (RFC 8693 2.1)": (
        lambda ex: ex.own(), {"actor_token": "SERVER_TOKEN"}, 400, "invalid_request", None,
    ),
    "actor_token_type without actor_token (RFC 8693 2.1)": (
        lambda ex: ex.own(), {"actor_token_type": ACCESS}, 400, "invalid_request", None,
    ),
    "two targets": (
        lambda ex: ex.own(), {"resource": [EXECUTION, CLEARING]}, 400, "invalid_target", None,
    ),
    # RFC 8693 §2.1 / RFC 8707 §2: resource is an absolute URI without a fragment
    "target with a fragment": (
        lambda ex: ex.own(), {"resource": EXECUTION + "#orders"}, 400, "invalid_target", None,
    ),
    "relative target": (lambda ex: ex.own(), {"resource": "/api"}, 400, "invalid_target", None),
    "audience and resource naming two targets": (
        lambda ex: ex.own(), {"audience": CLEARING}, 400, "invalid_target", None,
    ),
    "audience the server does not know": (
        lambda ex: ex.own(), {"resource": None, "audience": "execution-service"},
        400, "invalid_target", None,
    ),
    "empty subject_token (RFC 6749 3.2: a parameter without a value is omitted)": (
        lambda ex: "", {}, 400, "invalid_request", None,
    ),
    "actor_token_type jwt (only our access tokens act)": (
        lambda ex: ex.own(),
        {"actor_token": "SERVER_TOKEN", "actor_token_type": TOKEN_TYPE_JWT},
        400, "invalid_request", "actor_type",
    ),
    "unknown exchange_mode": (
        lambda ex: ex.own(), {"exchange_mode": "proxy"}, 400, "invalid_request", None,
    ),
    "impersonation with an actor token": (
        lambda ex: ex.own(),
        {"exchange_mode": "impersonation", "actor_token": "SERVER_TOKEN", "actor_token_type": ACCESS},
        400, "invalid_request", "impersonation_actor",
    ),
    "impersonation of a delegated token": (
        lambda ex: ex.own(act={"sub": "arr-oms", "iss": "https://arranger.example"}),
        {"exchange_mode": "impersonation"}, 400, "invalid_request", "impersonation_of_delegated",
    ),
    "actor token of another client": (
        lambda ex: ex.own(), {"actor_token": "SERVER_TOKEN", "actor_token_type": ACCESS},
        400, "invalid_request", "actor_client",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
async def test_refusal_has_the_exact_error_and_a_deny_entry(ex: Exchange, case: str) -> None:
    make, form, status, error, reason_id = CASES[case]
    if form.get("actor_token") == "SERVER_TOKEN":
        form = {**form, "actor_token": await ex.server.access_token()}  # the module's other client
    response, client_jti = await ex.post(make(ex), **form)

    assert error_of(response) == (status, error), response.text
    event = await ex.refusal(client_jti)
    assert event["reason"] == error
    if reason_id is not None:
        assert event["reason_ids"] == [reason_id]


async def test_partner_token_for_an_audience_the_client_only_calls_is_refused(
    ex: Exchange,
) -> None:
    """A partner's token addressed to one of our resources is exchanged by that resource's
    operator-made resource server only; ``allowed_resources`` (may call it) is not enough."""
    caller = await register_kit(
        ex.server.services,
        grant_types=["client_credentials", TOKEN_EXCHANGE],
        introspection_resources=[],
    )
    to_us = ex.partner_access(ex.a, aud=ex.server.issuer)

    refused, client_jti = await ex.post(ex.partner_access(ex.a), kit=caller)
    allowed, _ = await ex.post(to_us, kit=caller)

    assert error_of(refused) == (400, "invalid_request"), refused.text
    assert (await ex.refusal(client_jti))["reason_ids"] == ["audience"]
    assert allowed.status_code == 200, allowed.text


async def test_widened_authorization_details_are_refused(ex: Exchange) -> None:
    """The subject token is limited to bond; a request dropping that constraint is wider."""
    wider = {k: v for k, v in TRADE.items() if k != "instrument_classes"}
    response, client_jti = await ex.post(
        ex.own(authorization_details=[TRADE]), authorization_details=orjson.dumps([wider]).decode()
    )
    assert error_of(response) == (400, "invalid_authorization_details"), response.text
    assert (await ex.refusal(client_jti))["reason"] == "invalid_authorization_details"


async def test_details_requested_against_a_token_without_details_are_refused(
    ex: Exchange,
) -> None:
    response, client_jti = await ex.post(
        ex.own(), authorization_details=orjson.dumps([TRADE]).decode()
    )
    assert error_of(response) == (400, "invalid_authorization_details"), response.text
    assert (await ex.refusal(client_jti))["reason"] == "invalid_authorization_details"


async def test_revoked_subject_token_is_invalid_request(ex: Exchange) -> None:
    subject = ex.own()
    revoke = await ex.server.http.post("/revoke", data={"token": subject, **ex.kit.auth()})
    assert revoke.status_code == 200, revoke.text
    response, client_jti = await ex.post(subject)
    assert error_of(response) == (400, "invalid_request")
    assert (await ex.refusal(client_jti))["reason_ids"] == ["revoked"]


async def test_revoking_a_subject_token_revokes_the_tokens_exchanged_from_it(ex: Exchange) -> None:
    """RFC 7009 revocation of one of our tokens reaches every token exchanged here from it, and
    from those (two hops): introspection says inactive, the bearer guard's list has them, each
    has its ledger entry naming the token it came from; an unrelated exchange stays active."""
    subject, other = ex.own(), ex.own()
    first, _ = await ex.post(subject)
    hop1 = first.json()["access_token"]
    second, _ = await ex.post(hop1)
    hop2 = second.json()["access_token"]
    bystander = (await ex.post(other))[0].json()["access_token"]
    jti1, jti2 = claims_of(hop1)["jti"], claims_of(hop2)["jti"]

    revoke = await ex.server.http.post("/revoke", data={"token": subject, **ex.kit.auth()})
    assert revoke.status_code == 200, revoke.text

    async def active(token: str) -> bool:
        form = {"token": token, **ex.kit.auth()}
        response = await ex.server.http.post("/introspect", data=form)
        assert response.status_code == 200, response.text
        return bool(response.json()["active"])

    assert not await active(hop1)
    assert not await active(hop2)
    assert await active(bystander)
    revoked = ex.server.services.revoked
    assert jti1 in revoked
    assert jti2 in revoked
    assert claims_of(bystander)["jti"] not in revoked
    events = await recent_events(ex.server.services.db, 20, "oauth:token:revoked")
    cascaded = {e["jti"]: e for e in events if e["reason"] == "derived_from_revoked"}
    assert set(cascaded) == {jti1, jti2}
    root = claims_of(subject)["jti"]
    assert cascaded[jti2]["payload"]["derived_from"] == jti1
    assert cascaded[jti1]["payload"]["derived_from"] == root
    assert {e["payload"]["revoked_with"] for e in cascaded.values()} == {root}


async def test_revoking_a_token_nothing_was_exchanged_from_writes_one_entry(ex: Exchange) -> None:
    token = ex.own()
    revoke = await ex.server.http.post("/revoke", data={"token": token, **ex.kit.auth()})
    assert revoke.status_code == 200, revoke.text
    events = await recent_events(ex.server.services.db, 20, "oauth:token:revoked")
    mine = [e for e in events if e["jti"] == claims_of(token)["jti"]]
    assert [e["reason"] for e in mine] == [None]
    assert not [e for e in events if (e["payload"] or {}).get("revoked_with") == mine[0]["jti"]]


async def test_a_revocation_landing_while_the_exchange_waits_for_its_write_refuses_it(
    ex: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subject token passed every check of the grant, then is revoked before the exchange's
    outcome is written: the write reads the revocation and the exchange is refused (PostgreSQL:
    in the batch's one statement)."""
    subject = ex.own()
    endpoint = ex.server.services.token_endpoint
    record, waiting, go = endpoint._outcomes.record, asyncio.Event(), asyncio.Event()

    async def held(outcome: Any) -> Any:
        waiting.set()
        await go.wait()
        return await record(outcome)

    monkeypatch.setattr(endpoint._outcomes, "record", held)
    exchange = asyncio.ensure_future(ex.post(subject))
    await waiting.wait()
    monkeypatch.setattr(endpoint._outcomes, "record", record)  # the revocation's own writes
    revoke = await ex.server.http.post("/revoke", data={"token": subject, **ex.kit.auth()})
    assert revoke.status_code == 200, revoke.text
    go.set()
    response, client_jti = await exchange

    assert error_of(response) == (400, "invalid_request")
    assert (await ex.refusal(client_jti))["reason_ids"] == ["revoked"]


async def test_exchanges_racing_a_revocation_are_issued_or_refused_whole(ex: Exchange) -> None:
    """Exchanges of one subject token in flight while it is revoked: each is either issued (its
    ledger entry and its derivation row written) or refused as revoked (its refusal written, no
    derivation row); every exchange sent after the revocation answered is refused."""
    subject = ex.own()
    db = ex.server.services.db

    async def revoke() -> httpx.Response:
        await asyncio.sleep(0)
        return await ex.server.http.post("/revoke", data={"token": subject, **ex.kit.auth()})

    *racing, revoked = await asyncio.gather(*(ex.post(subject) for _ in range(24)), revoke())
    assert revoked.status_code == 200, revoked.text
    after = await asyncio.gather(*(ex.post(subject) for _ in range(4)))

    async with db.read() as conn:
        rows = await conn.exec_driver_sql(
            "SELECT jti FROM ssf_derivations WHERE origin_jti = ?"
            if conn.dialect.name == "sqlite"
            else "SELECT jti FROM ssf_derivations WHERE origin_jti = $1",
            (claims_of(subject)["jti"],),
        )
        derived = [row[0] for row in rows]
    issued = [r for r, _ in racing + after if r.status_code == 200]
    assert len(derived) == len(issued)  # none for a refused exchange
    for response, client_jti in racing + after:
        if response.status_code == 200:
            jti = claims_of(response.json()["access_token"])["jti"]
            assert jti in derived
            events = await recent_events(db, 200, "oauth:token:issued")
            assert [e for e in events if e["jti"] == jti]
        else:
            assert error_of(response) == (400, "invalid_request"), response.text
            assert (await ex.refusal(client_jti))["reason_ids"] == ["revoked"]
    assert [error_of(r) for r, _ in after] == [(400, "invalid_request")] * 4


def subject_tokens(ex: Exchange) -> SubjectTokens:
    grant = ex.server.services.token_endpoint._grants[TOKEN_EXCHANGE]
    assert isinstance(grant, TokenExchangeGrant)
    return grant._subjects


async def test_a_cached_subject_token_that_was_revoked_is_still_refused(ex: Exchange) -> None:
    """The verified-token cache keeps the signature check only: revocation is checked with each
    outcome, so the exchange after the revocation is refused although the token is cached."""
    cache = subject_tokens(ex).verified
    subject = ex.own(scopes=("order:create", "settlement:submit"))
    first, _ = await ex.post(subject)
    hits = cache.hits
    again, _ = await ex.post(subject, resource=CLEARING, scope="settlement:submit")
    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert cache.hits == hits + 1  # the second exchange was served from the cache
    revoke = await ex.server.http.post("/revoke", data={"token": subject, **ex.kit.auth()})
    assert revoke.status_code == 200, revoke.text
    response, client_jti = await ex.post(subject)
    assert error_of(response) == (400, "invalid_request")
    assert (await ex.refusal(client_jti))["reason_ids"] == ["revoked"]
    assert cache.hits == hits + 2  # refused although the signature check came from the cache


async def test_a_cached_subject_token_is_refused_from_its_exp(ex: Exchange) -> None:
    subjects, token = subject_tokens(ex), ex.own(lifetime=300, scopes=("order:create",))
    exp = claims_of(token)["exp"]
    client = await ex.server.services.clients.get(ex.kit.client_id)
    assert client is not None
    await subjects.verify(token, ACCESS, client, exp - 1)
    hits = subjects.verified.hits
    assert (await subjects.verify(token, ACCESS, client, exp - 1)).jti == claims_of(token)["jti"]
    assert subjects.verified.hits == hits + 1
    for now in (exp, exp + 1):
        with pytest.raises(InvalidRequestError) as refused:
            await subjects.verify(token, ACCESS, client, now)
        assert refused.value.reason_id == "expired"
    assert subjects.verified.hits == hits + 1  # the expired entry was dropped, not served


async def test_a_cached_subject_token_is_not_read_again(
    ex: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Presented again, one of our verified tokens is served from the cache without parsing its
    text again; every other check still runs (here: the exchanging client's right)."""
    subjects, token = subject_tokens(ex), ex.own()
    client = await ex.server.services.clients.get(ex.kit.client_id)
    assert client is not None
    now = int(time.time())
    first = await subjects.verify(token, ACCESS, client, now)

    def unread(text: str) -> None:
        raise AssertionError("the subject token was parsed again")

    monkeypatch.setattr("trustplane.oauth.exchange.subject.parse", unread)
    again = await subjects.verify(token, ACCESS, client, now)
    assert (again.jti, again.right, again.scopes) == (first.jti, first.right, first.scopes)
    elsewhere = replace(client, metadata={**client.metadata, "allowed_resources": []})
    with pytest.raises(InvalidRequestError) as refused:  # the right is checked from the claims
        await subjects.verify(token, ACCESS, elsewhere, now)
    assert refused.value.reason_id == "audience"


async def test_a_new_subject_token_is_parsed_once(
    ex: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subject token not seen before is split and decoded once: the signature is verified over
    that parse (not over a second one of the same text), and the result is remembered."""
    subjects, token = subject_tokens(ex), ex.own()
    client = await ex.server.services.clients.get(ex.kit.client_id)
    assert client is not None
    parsed: list[str] = []
    init = ParsedJWS.__init__

    def counted(self: ParsedJWS, text: str) -> None:
        parsed.append(text)
        init(self, text)

    monkeypatch.setattr(ParsedJWS, "__init__", counted)
    misses = subjects.verified.misses
    subject = await subjects.verify(token, ACCESS, client, int(time.time()))
    assert parsed == [token]
    assert subject.jti == claims_of(token)["jti"]
    assert (subjects.verified.misses, len(parsed)) == (misses + 1, 1)
    assert subjects.verified.known(token, int(time.time())) is not None


@pytest.mark.parametrize("part", ["signature", "payload"])
async def test_a_token_differing_from_a_cached_one_is_verified_in_full(
    ex: Exchange, part: str
) -> None:
    subjects, token = subject_tokens(ex), ex.own()
    client = await ex.server.services.clients.get(ex.kit.client_id)
    assert client is not None
    now = int(time.time())
    await subjects.verify(token, ACCESS, client, now)  # cached
    header, payload, signature = token.split(".")
    if part == "signature":  # a character in the middle: other signature bytes
        i = len(signature) // 2
        signature = signature[:i] + ("A" if signature[i] != "A" else "B") + signature[i + 1 :]
    else:  # the same signature over other claims (a wider scope)
        claims = {**claims_of(token), "scope": "order:create order:cancel settlement:submit"}
        payload = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    misses = subjects.verified.misses
    with pytest.raises(InvalidRequestError) as refused:
        await subjects.verify(f"{header}.{payload}.{signature}", ACCESS, client, now)
    assert refused.value.reason_id == "signature"
    assert subjects.verified.misses == misses + 1


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c"])
async def test_key_or_url_in_subject_header_is_refused_without_outbound_request(
    ex: Exchange, header: str
) -> None:
    values: dict[str, Any] = {
        "jku": "https://keys.partner-a.example/jwks",
        "x5u": "https://keys.partner-a.example/cert.pem",
        "jwk": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
        "x5c": ["MIIB"],
    }
    subject = ex.partner_access(ex.a, _headers={header: values[header]})
    response, client_jti = await ex.post(subject)
    assert error_of(response) == (400, "invalid_request")
    assert (await ex.refusal(client_jti))["reason_ids"] == ["key_in_header"]
    assert ex.outbound == []


async def test_replayed_partner_assertion_is_refused(ex: Exchange) -> None:
    assertion = ex.a.assertion()
    first, _ = await ex.post(assertion, subject_token_type=TOKEN_TYPE_JWT)
    again, client_jti = await ex.post(assertion, subject_token_type=TOKEN_TYPE_JWT)
    assert first.status_code == 200, first.text
    assert error_of(again) == (400, "invalid_request")
    event = await ex.refusal(client_jti)
    assert (event["reason_ids"], event["partner"]) == (["replay"], "partner-a")


async def test_racing_replays_of_one_partner_assertion_succeed_once(ex: Exchange) -> None:
    """Racing requests with one assertion (on PostgreSQL: the group-commit batch and the primary
    key decide): exactly one is issued, every other is refused as a replay."""
    assertion = ex.a.assertion()
    results = await asyncio.gather(
        *(ex.post(assertion, subject_token_type=TOKEN_TYPE_JWT) for _ in range(8))
    )
    statuses = sorted(r.status_code for r, _ in results)
    assert statuses == [200] + [400] * 7
    for response, client_jti in results:
        if response.status_code == 400:
            assert response.json()["error"] == "invalid_request"
            assert (await ex.refusal(client_jti))["reason_ids"] == ["replay"]


async def test_client_without_the_grant_type_is_unauthorized_client(ex: Exchange) -> None:
    response, client_jti = await ex.post(ex.own(), kit=ex.server.kit)
    assert error_of(response) == (400, "unauthorized_client")
    assert (await ex.refusal(client_jti))["reason"] == "unauthorized_client"


async def test_discovery_lists_the_grant(ex: Exchange) -> None:
    meta = (await ex.server.http.get("/.well-known/oauth-authorization-server")).json()
    assert TOKEN_EXCHANGE in meta["grant_types_supported"]


def counted(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_repeated_exchange_is_decided_from_the_one_token_policy_cache(
    ex: Exchange,
) -> None:
    """The exchange asks the one ``TokenPolicy``: the same inputs again are a cache hit, still
    recorded as a decision of its own (own id, the transaction id) and counted as one."""
    subject = ex.own(txn="txn-cached")
    first, _ = await ex.post(subject)
    hits = counted("trustplane_policy_token_cache_total", {"result": "hit"})
    allowed = counted("trustplane_policy_decisions_total", {"decision": "allow"})
    second, _ = await ex.post(subject)

    assert (first.status_code, second.status_code) == (200, 200)
    assert counted("trustplane_policy_token_cache_total", {"result": "hit"}) == hits + 1
    assert counted("trustplane_policy_decisions_total", {"decision": "allow"}) == allowed + 1
    decisions = await recent_events(ex.server.services.db, 20, "policy:decision:allowed")
    mine = [d for d in decisions if d["transaction_id"] == "txn-cached"]
    assert len({d["event_id"] for d in mine}) == 2
    assert mine[0]["payload"]["cached"] is True
    assert {d["payload"]["action"] for d in mine} == {"token:exchange"}


# --------------------------------------------------------------------------- impersonation


def impersonation_for(client_id: str) -> BundleSource:
    """The default bundle with ``exchange.no_impersonation`` narrowed: ``client_id`` may impersonate
    for the execution API (and nobody else, anywhere else)."""
    files = dict(default_bundle().files)
    before, rule = files["exchange.cedar"].split('@id("exchange.no_impersonation")')
    after = rule.split("};\n", 1)[1]  # the rules that follow it stay as they are
    files["exchange.cedar"] = (
        before
        + (
            '@id("exchange.no_impersonation")\n'
            'forbid (principal, action == Action::"token:exchange", resource)\n'
            "when { context.impersonation &&\n"
            f'  !(principal == Client::"{client_id}" && context.audience == "{EXECUTION}") }};\n'
        )
        + after
    )
    return BundleSource(files)


async def test_impersonation_is_refused_by_the_default_bundle(ex: Exchange) -> None:
    response, client_jti = await ex.post(ex.own(), exchange_mode="impersonation")

    assert error_of(response) == (400, "invalid_scope"), response.text
    assert "impersonation" in response.json()["error_description"]
    event = await ex.refusal(client_jti)
    assert event["reason"] == "invalid_scope"
    assert "exchange.no_impersonation" in event["payload"]["detail"]
    denials = await recent_events(ex.server.services.db, 10, "policy:decision:denied")
    assert any(d["reason_ids"] == ["exchange.no_impersonation"] for d in denials)


async def test_impersonation_where_policy_permits_it_issues_no_act(ex: Exchange) -> None:
    policy = ex.server.services.policy
    allowed = await policy.publish(impersonation_for(ex.kit.client_id), "CR-IMP", "ops")
    await policy.activate(allowed.record.version, "ops", "CR-IMP")
    try:
        subject = ex.own(txn="txn-imp")
        response, _ = await ex.post(subject, exchange_mode="impersonation")
        elsewhere, _ = await ex.post(
            ex.own(aud=ex.server.issuer, scopes=("order:create", "settlement:submit")),
            exchange_mode="impersonation", resource=CLEARING, scope="settlement:submit",
        )  # fmt: skip
    finally:
        await policy.rollback("ops", "CR-IMP", from_version=allowed.record.version)

    assert response.status_code == 200, response.text
    issued = claims_of(response.json()["access_token"])
    assert "act" not in issued
    assert (issued["sub"], issued["client_id"]) == ("alice", ex.kit.client_id)
    assert issued["prv"] == {"iss": ex.server.issuer, "jti": claims_of(subject)["jti"]}
    assert issued["txn"] == "txn-imp"
    events = await recent_events(ex.server.services.db, 5, "oauth:token:issued")
    (event,) = [e for e in events if e["jti"] == issued["jti"]]
    assert event["actor_chain"] == []
    exchange = event["payload"]["exchange"]
    assert (exchange["mode"], exchange["impersonated_by"]) == ("impersonation", ex.kit.client_id)
    assert "act" not in exchange
    # the same bundle still refuses impersonation towards another audience
    assert error_of(elsewhere) == (400, "invalid_scope"), elsewhere.text


@pytest.mark.parametrize(
    "requested",
    [
        "urn:ietf:params:oauth:token-type:id_token",
        "urn:ietf:params:oauth:token-type:refresh_token",
        "urn:ietf:params:oauth:token-type:saml2",
        "urn:example:unknown",
    ],
)
async def test_an_unsupported_requested_token_type_is_refused(ex: Exchange, requested: str) -> None:
    """RFC 8693 §2.1: we issue access tokens and Txn-Tokens only, never silently another type."""
    response, _ = await ex.post(ex.own(), requested_token_type=requested)

    assert error_of(response) == (400, "invalid_request")
    assert requested in response.json()["error_description"]


async def test_an_access_token_may_be_asked_for_by_name(ex: Exchange) -> None:
    response, _ = await ex.post(ex.own(), requested_token_type=ACCESS)

    assert response.status_code == 200, response.text
    assert response.json()["issued_token_type"] == ACCESS
