"""The SSF push receiver (RFC 8935) in process, on SQLite and PostgreSQL: a partner's CAEP
``session-revoked`` makes the tokens we derived from its token (by real token exchanges) inactive,
transitively, and our own transmitter passes the revocation on; every refusal answers 400 with the
RFC 8935 §2.3 error code. SETs are minted with PyJWT, as a partner's transmitter would."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio

from tests.conftest import EXECUTION, LEI, ClientKit, new_ec_key, register_kit
from tests.federation.partners import TOKEN_TYPE_JWT, Partner
from tests.protocol_server import DATABASES, Server, running_server
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.oauth.exchange import TOKEN_EXCHANGE
from trustplane.protocol.tokens import issue_access_token
from trustplane.ssf.transmitter import SESSION_REVOKED, TOKEN_CLAIMS_CHANGE, VERIFICATION

pytestmark = pytest.mark.asyncio(loop_scope="module")
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
SET_TYPE = "application/secevent+jwt"


@dataclass
class World:
    server: Server
    kit: ClientKit  # exchanges partner tokens at us
    a: Partner  # has an ssf member
    b: Partner  # has none

    @property
    def receiver(self) -> str:
        return self.server.issuer + "/ssf/receiver"

    def partner_access(self, partner: Partner, **claims: Any) -> str:
        return partner.assertion(
            aud=EXECUTION, scope="order:create", _headers={"typ": "at+jwt"}, **claims
        )

    async def exchange(self, subject_token: str) -> str:
        answer = await self.server.http.post(
            "/token",
            data={
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": subject_token,
                "subject_token_type": ACCESS,
                "resource": EXECUTION,
                "scope": "order:create",
                **self.kit.auth(),
            },
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["access_token"])

    async def active(self, token: str) -> bool:
        answer = await self.server.http.post(
            "/introspect", data={"token": token, **self.kit.auth()}
        )
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["active"])

    def set_for(
        self, partner: Partner, events: dict[str, Any], sub_id: dict[str, Any], **over: Any
    ) -> str:
        claims: dict[str, Any] = {
            "iss": partner.issuer,
            "aud": self.receiver,
            "iat": int(time.time()),
            "jti": uuid.uuid4().hex,
            "sub_id": sub_id,
            "events": events,
        }
        headers = {"typ": "secevent+jwt", "kid": partner.kid, **over.pop("_headers", {})}
        key = over.pop("_key", partner.key)
        claims.update(over)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key, algorithm="ES256", headers=headers)

    async def push(self, token: str, content_type: str = SET_TYPE) -> httpx.Response:
        return await self.server.http.post(
            "/ssf/receiver", content=token.encode(), headers={"Content-Type": content_type}
        )


def jti_of(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def revoked_event() -> dict[str, Any]:
    return {SESSION_REVOKED: {"event_timestamp": int(time.time())}}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    async with running_server(request, tmp_path_factory) as server:
        svc = server.services
        svc.federation.registry.remote_jwks = RemoteJwksCache(
            transport=httpx.MockTransport(lambda r: httpx.Response(404))
        )
        a = Partner("partner-a", "https://idp.partner-a.example", server.issuer)
        b = Partner("partner-b", "https://idp.partner-b.example", server.issuer)
        both = [TOKEN_TYPE_JWT, ACCESS]
        ssf = {"configuration_url": a.issuer + "/.well-known/ssf-configuration"}
        await svc.federation.add(a.profile(accepted_token_types=both, ssf=ssf), changed_by="t")
        await svc.federation.add(b.profile(accepted_token_types=both), changed_by="t")
        kit = await register_kit(
            svc,
            grant_types=["client_credentials", TOKEN_EXCHANGE],
        )
        yield World(server, kit, a, b)


async def test_session_revoked_by_jwt_id_makes_derived_tokens_inactive(world: World) -> None:
    partner_token = world.partner_access(world.a)
    derived = await world.exchange(partner_token)
    second_hop = await world.exchange(derived)  # derived here from the derived token
    unrelated = await world.exchange(world.partner_access(world.a))
    assert await world.active(derived)
    assert await world.active(second_hop)
    # our own transmitter tells a poll stream what the receiver revokes here
    token = issue_access_token(
        world.server.services.keys.ring,
        issuer=world.server.issuer,
        subject=world.kit.client_id,
        client_id=world.kit.client_id,
        audience=world.server.issuer + "/ssf",
        scopes=("ssf:stream",),
        lifetime=300,
        extra={"lei": LEI},
    ).token
    bearer = {"Authorization": f"Bearer {token}"}
    stream = (
        await world.server.http.post(
            "/ssf/stream", json={"events_requested": [SESSION_REVOKED]}, headers=bearer
        )
    ).json()

    sub_id = {"format": "jwt_id", "iss": world.a.issuer, "jti": jti_of(partner_token)}
    answer = await world.push(world.set_for(world.a, revoked_event(), sub_id))

    assert answer.status_code == 202, answer.text
    assert not await world.active(derived)
    assert not await world.active(second_hop)
    assert await world.active(unrelated)
    polled = await world.server.http.post(
        f"/ssf/poll/{stream['stream_id']}", json={"returnImmediately": True}, headers=bearer
    )
    about = {
        jwt.decode(t, options={"verify_signature": False})["sub_id"]["jti"]
        for t in polled.json()["sets"].values()
    }
    assert about == {jti_of(derived), jti_of(second_hop)}
    # a repeated SET is harmless (RFC 8935 receivers may see duplicates)
    again = await world.push(world.set_for(world.a, revoked_event(), sub_id))
    assert again.status_code == 202


async def test_claims_change_by_iss_sub_revokes_every_token_of_the_subject(world: World) -> None:
    first = await world.exchange(world.partner_access(world.a, sub="trader-7"))
    second = await world.exchange(world.partner_access(world.a, sub="trader-7"))
    other = await world.exchange(world.partner_access(world.a, sub="trader-8"))
    sub_id = {"format": "iss_sub", "iss": world.a.issuer, "sub": "trader-7"}
    event = {TOKEN_CLAIMS_CHANGE: {"event_timestamp": int(time.time()), "claims": {"role": "x"}}}
    answer = await world.push(world.set_for(world.a, event, sub_id))
    assert answer.status_code == 202, answer.text
    assert not await world.active(first)
    assert not await world.active(second)
    assert await world.active(other)


async def test_a_verification_event_is_accepted(world: World) -> None:
    event = {VERIFICATION: {"state": "abc"}}
    sub_id = {"format": "opaque", "id": "stream-1"}
    answer = await world.push(world.set_for(world.a, event, sub_id))
    assert answer.status_code == 202


def _subject(world: World) -> dict[str, Any]:
    return {"format": "jwt_id", "iss": world.a.issuer, "jti": "j-1"}


REFUSALS: dict[str, tuple[Any, str]] = {
    "not a SET content type": (lambda w: (w.set_for(w.a, revoked_event(), _subject(w)), "application/jwt"), "invalid_request"),
    "typ JWT": (lambda w: (w.set_for(w.a, revoked_event(), _subject(w), _headers={"typ": "JWT"}), SET_TYPE), "invalid_request"),
    "not a JWS": (lambda w: ("not-a-jws", SET_TYPE), "invalid_request"),
    "unknown issuer": (lambda w: (w.set_for(w.a, revoked_event(), _subject(w), iss="https://stranger.example"), SET_TYPE), "invalid_issuer"),
    "another key": (lambda w: (w.set_for(w.a, revoked_event(), _subject(w), _key=new_ec_key()), SET_TYPE), "invalid_key"),
    "key in the header": (lambda w: (w.set_for(w.a, revoked_event(), _subject(w), _headers={"jku": "https://x.example/j"}), SET_TYPE), "invalid_key"),
    "another audience": (lambda w: (w.set_for(w.a, revoked_event(), _subject(w), aud="https://elsewhere.example/r"), SET_TYPE), "invalid_audience"),
    "partner without ssf": (lambda w: (w.set_for(w.b, revoked_event(), {"format": "jwt_id", "iss": w.b.issuer, "jti": "j"}), SET_TYPE), "access_denied"),
    "another issuer's subject": (lambda w: (w.set_for(w.a, revoked_event(), {"format": "jwt_id", "iss": w.b.issuer, "jti": "j"}), SET_TYPE), "access_denied"),
    "no events": (lambda w: (w.set_for(w.a, {}, _subject(w)), SET_TYPE), "invalid_request"),
    "with sub": (lambda w: (w.set_for(w.a, revoked_event(), _subject(w), sub="trader-7"), SET_TYPE), "invalid_request"),
    "with exp": (lambda w: (w.set_for(w.a, revoked_event(), _subject(w), exp=int(time.time()) + 60), SET_TYPE), "invalid_request"),
    "iat in the future": (lambda w: (w.set_for(w.a, revoked_event(), _subject(w), iat=int(time.time()) + 3600), SET_TYPE), "invalid_request"),
    "no subject": (lambda w: (w.set_for(w.a, revoked_event(), None), SET_TYPE), "invalid_request"),
    "jwt_id without jti": (lambda w: (w.set_for(w.a, revoked_event(), {"format": "jwt_id", "iss": w.a.issuer}), SET_TYPE), "invalid_request"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refusals(world: World, case: str) -> None:
    make, err = REFUSALS[case]
    token, content_type = make(world)
    answer = await world.push(token, content_type)
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/json"  # RFC 8935 §2.3: MUST
    assert answer.json()["err"] == err
    assert answer.json()["description"]


async def test_a_refused_set_revokes_nothing(world: World) -> None:
    partner_token = world.partner_access(world.a)
    derived = await world.exchange(partner_token)
    sub_id = {"format": "jwt_id", "iss": world.a.issuer, "jti": jti_of(partner_token)}
    forged = world.set_for(world.a, revoked_event(), sub_id, _key=new_ec_key())
    assert (await world.push(forged)).status_code == 400
    assert await world.active(derived)


async def test_a_partner_mandate_event_revokes_the_tokens_resting_on_it(world: World) -> None:
    """The partner's token names its mandate (``mandate`` claim, kept in ``prv``); the partner's
    CAEP events about that mandate use an RFC 9493 complex subject with the mandate as session."""
    on_m1 = await world.exchange(world.partner_access(world.a, mandate={"id": "m-1", "version": 2}))
    on_m2 = await world.exchange(world.partner_access(world.a, mandate={"id": "m-2", "version": 1}))
    sub_id = {"format": "complex", "session": {"format": "opaque", "id": "m-1"}}

    def change(status: str) -> dict[str, Any]:
        body = {"event_timestamp": int(time.time()), "claims": {"mandate_status": status}}
        return {TOKEN_CLAIMS_CHANGE: body}

    resumed = await world.push(world.set_for(world.a, change("active"), sub_id))
    assert resumed.status_code == 202
    assert await world.active(on_m1)  # a resumed mandate takes nothing away
    suspended = await world.push(world.set_for(world.a, change("suspended"), sub_id))
    assert suspended.status_code == 202, suspended.text
    assert not await world.active(on_m1)
    assert await world.active(on_m2)


def ssf_receiver(world: World) -> Any:
    return next(c for c in world.server.services.components if c.name == "ssf").receiver


def profile_a(world: World) -> Any:
    return next(
        p
        for p in world.server.services.federation.registry.profiles()
        if p.partner_id == "partner-a"
    )


async def test_a_set_with_a_critical_subject_member_we_cannot_process_is_discarded(
    world: World,
) -> None:
    """SSF 1.0 "Receiver Subject Processing": a receiver MUST discard an event whose subject has a
    member the transmitter's ``critical_subject_members`` (§7.1) names and it cannot process
    (400 ``invalid_request``); a member that is not critical is processed as well as we can (the
    session). Before, the subject's other members were ignored and the session's tokens revoked
    whatever the critical member restricted the event to."""
    receiver = ssf_receiver(world)
    on_m3 = await world.exchange(world.partner_access(world.a, mandate={"id": "m-3", "version": 1}))
    session = {"format": "opaque", "id": "m-3"}
    user = {"format": "iss_sub", "iss": world.a.issuer, "sub": "trader-9"}
    receiver.learn_configuration(
        profile_a(world), {"critical_subject_members": ["user", "session"]}
    )
    for sub_id in (
        {"format": "complex", "session": session, "user": user},  # critical, not processed
        {"format": "complex", "session": {"format": "email", "email": "a@b.example"}},
    ):
        answer = await world.push(world.set_for(world.a, revoked_event(), sub_id))
        assert answer.status_code == 400, answer.text
        assert answer.json()["err"] == "invalid_request"
        assert "critical member" in answer.json()["description"]
        assert await world.active(on_m3)  # discarded: nothing acted on
    # the same member where the event carries it (CAEP drafts), not in sub_id
    in_event = {
        SESSION_REVOKED: {"subject": {"format": "complex", "session": session, "user": user}}
    }
    answer = await world.push(world.set_for(world.a, in_event, None))
    assert answer.status_code == 400, answer.text
    assert answer.json()["err"] == "invalid_request"
    assert await world.active(on_m3)
    # not critical: the event is acted on by the member we process
    sub_id = {"format": "complex", "session": session, "device": {"format": "opaque", "id": "d"}}
    answer = await world.push(world.set_for(world.a, revoked_event(), sub_id))
    assert answer.status_code == 202, answer.text
    assert not await world.active(on_m3)


async def test_unknown_critical_members_discard_every_member_we_cannot_process(
    world: World,
) -> None:
    """Until the subscriber has read the transmitter's configuration (or when its
    ``critical_subject_members`` cannot be read), every member but the session is taken as critical:
    what we cannot be sure we understand is not acted on."""
    receiver = ssf_receiver(world)
    on_m4 = await world.exchange(world.partner_access(world.a, mandate={"id": "m-4", "version": 1}))
    sub_id = {"format": "complex", "session": {"format": "opaque", "id": "m-4"}, "device": {"format": "opaque", "id": "d"}}  # fmt: skip
    for config in ({"critical_subject_members": "user"}, {"critical_subject_members": [7]}, None):
        if config is None:
            receiver._critical.clear()  # not learned in this process
        else:
            receiver.learn_configuration(profile_a(world), config)
        answer = await world.push(world.set_for(world.a, revoked_event(), sub_id))
        assert answer.status_code == 400, answer.text
        assert answer.json()["err"] == "invalid_request"
        assert await world.active(on_m4)
    only_session = {"format": "complex", "session": {"format": "opaque", "id": "m-4"}}
    answer = await world.push(world.set_for(world.a, revoked_event(), only_session))
    assert answer.status_code == 202, answer.text
    assert not await world.active(on_m4)
