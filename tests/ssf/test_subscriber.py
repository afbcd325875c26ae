"""The receiver's subscription round against a partner transmitter answered by httpx's mock
transport (every rule of the guarded fetcher but the socket check still applies): what it sends,
that it reuses a stream it already has, and that a transmitter claiming another issuer is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest

from tests.conftest import make_settings
from tests.federation.partners import Partner
from trustplane.app import Services
from trustplane.federation.profile import build_profile
from trustplane.outbound import OutboundFetcher
from trustplane.ssf.receiver import Receiver, SetRefused, check_critical_members
from trustplane.ssf.subscriber import ASSERTION_TYPE, REQUESTED, Subscriber
from trustplane.ssf.transmitter import PUSH
from trustplane.storage.migrate import upgrade

wall_clock = time.time
PARTNER = "https://idp.partner-a.example"
RECEIVER = "http://127.0.0.1:8000/ssf/receiver"


def transmitter(
    seen: list[httpx.Request],
    streams: list[dict[str, Any]],
    issuer: str = PARTNER,
    stream_iss: str = PARTNER,
    **extra: Any,
) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path.startswith("/.well-known/ssf-configuration"):
            return httpx.Response(200, json={
                "issuer": issuer, "delivery_methods_supported": [PUSH],
                "configuration_endpoint": f"{PARTNER}/ssf/stream", **extra,
            })  # fmt: skip
        if path == "/.well-known/oauth-authorization-server":
            return httpx.Response(200, json={"token_endpoint": f"{PARTNER}/token"})
        if path == "/token":
            return httpx.Response(200, json={"access_token": "at-1", "token_type": "Bearer"})
        if path == "/ssf/stream" and request.method == "GET":
            return httpx.Response(200, json=streams)
        if path == "/ssf/stream" and request.method == "POST":
            created = {"stream_id": "s-new", "iss": stream_iss, **orjson.loads(request.content)}
            return httpx.Response(201, json=created)
        return httpx.Response(404)

    return answer


@pytest.fixture
async def services(tmp_path: Path) -> Any:
    svc = Services.build(make_settings(f"sqlite+aiosqlite:///{tmp_path / 't.db'}", tmp_path))
    await upgrade(svc.db)
    await svc.keys.ensure()
    await svc.keys.load()
    yield svc
    await svc.db.dispose()


def subscriber(
    services: Services,
    handler: Callable[[httpx.Request], httpx.Response],
    configuration_url: str = f"{PARTNER}/.well-known/ssf-configuration",
    receiver: Receiver | None = None,
) -> Any:
    partner = Partner("partner-a", PARTNER, "x")
    doc = partner.profile(ssf={"configuration_url": configuration_url, "client_id": "c-9"})
    profile = build_profile(doc, [], version=1)
    services.federation.registry.replace_all([profile])
    fetcher = OutboundFetcher(transport=httpx.MockTransport(handler))
    made = Subscriber(
        services.settings.issuer,
        RECEIVER,
        services.federation.registry,
        services.keys,
        fetcher,
        60,
        learned=receiver.learn_configuration if receiver is not None else None,
    )
    return made, profile


async def test_a_push_stream_is_created_with_our_signed_client_assertion(
    services: Services,
) -> None:
    seen: list[httpx.Request] = []
    made, _ = subscriber(services, transmitter(seen, []))
    await made.round()
    assert made.subscriptions["partner-a"].stream_id == "s-new"
    token_request = next(r for r in seen if r.url.path == "/token")
    form = dict(httpx.QueryParams(token_request.content.decode()))
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "ssf:stream"
    assert form["resource"] == f"{PARTNER}/ssf"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    jwks = orjson.loads(services.keys.ring.jwks_json)
    header = jwt.get_unverified_header(form["client_assertion"])
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    claims = jwt.decode(
        form["client_assertion"], jwt.PyJWK(key).key, algorithms=[header["alg"]], audience=PARTNER
    )
    assert claims["iss"] == claims["sub"] == "c-9"
    create = next(r for r in seen if r.url.path == "/ssf/stream" and r.method == "POST")
    assert create.headers["authorization"] == "Bearer at-1"
    body = orjson.loads(create.content)
    assert body["delivery"] == {"method": PUSH, "endpoint_url": RECEIVER}
    assert body["events_requested"] == REQUESTED
    # the next round does nothing: the stream is known for this profile version
    seen.clear()
    await made.round()
    assert seen == []


async def test_an_existing_stream_to_our_receiver_is_reused(services: Services) -> None:
    seen: list[httpx.Request] = []
    existing = [
        {
            "stream_id": "s-old",
            "iss": PARTNER,
            "delivery": {"method": PUSH, "endpoint_url": RECEIVER},
        }
    ]
    made, _ = subscriber(services, transmitter(seen, existing))
    await made.round()
    assert made.subscriptions["partner-a"].stream_id == "s-old"
    assert not [r for r in seen if r.method == "POST" and r.url.path == "/ssf/stream"]


async def test_a_transmitter_claiming_another_issuer_is_refused(services: Services) -> None:
    seen: list[httpx.Request] = []
    made, _ = subscriber(services, transmitter(seen, [], issuer="https://idp.evil.example"))
    await made.round()
    state = made.subscriptions["partner-a"]
    assert state.stream_id is None
    assert state.error == "the transmitter's issuer is not one of the partner's issuers"
    assert [r.url.path for r in seen] == ["/.well-known/ssf-configuration"]  # no token asked


async def test_a_configuration_for_another_issuer_than_its_url_names_is_refused(
    services: Services,
) -> None:
    """SSF 1.0 §7.2.4: the document's ``issuer`` MUST be the issuer the URL was formed from
    (``/.well-known/ssf-configuration/t1`` is issuer ``{host}/t1``'s), else its data MUST NOT be
    used. Only "one of the partner's issuers" was checked."""
    seen: list[httpx.Request] = []
    made, _ = subscriber(
        services, transmitter(seen, []), f"{PARTNER}/.well-known/ssf-configuration/t1"
    )
    await made.round()
    state = made.subscriptions["partner-a"]
    assert state.stream_id is None
    assert state.error == "the transmitter's issuer is not the one its URL names"
    assert len(seen) == 1  # nothing else asked


async def test_a_stream_naming_another_iss_is_refused(services: Services) -> None:
    """SSF 1.0 §8.1.1.1-2: the receiver MUST check that the stream's ``iss`` is the issuer it got
    the configuration from (it was not looked at)."""
    seen: list[httpx.Request] = []
    made, _ = subscriber(services, transmitter(seen, [], stream_iss="https://idp.other.example"))
    await made.round()
    state = made.subscriptions["partner-a"]
    assert state.stream_id is None
    assert state.error == "the transmitter's stream names another iss"


async def test_the_transmitters_critical_subject_members_reach_the_receiver(
    services: Services,
) -> None:
    """SSF 1.0 §7.1: ``critical_subject_members`` of the configuration the subscriber fetched
    and checked are what the receiver holds the partner's subjects to (they were not kept)."""
    receiver = next(c for c in services.components if c.name == "ssf").receiver
    handler = transmitter([], [], critical_subject_members=["user"])
    made, profile = subscriber(services, handler, receiver=receiver)
    await made.round()
    assert made.subscriptions["partner-a"].stream_id == "s-new"
    critical = receiver._critical_of(profile)
    assert critical == frozenset({"user"})
    session = {"format": "opaque", "id": "m-1"}
    check_critical_members({"format": "complex", "session": session, "device": {}}, critical)
    with pytest.raises(SetRefused) as refused:
        check_critical_members({"format": "complex", "session": session, "user": {}}, critical)
    assert refused.value.err == "invalid_request"


async def test_the_loop_sleeps_until_a_reload_or_its_interval(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its first round the subscriber looks again only when the registry reloads (a new
    profile version subscribes again at once) or its interval passes: no short poll of the
    registry in between (the old loop looked five times a second)."""
    from trustplane.ssf import subscriber as module

    looks: list[float] = []

    class Clock:
        time = staticmethod(wall_clock)

        @staticmethod
        def monotonic() -> float:
            looks.append(time.monotonic())
            return time.monotonic()

    monkeypatch.setattr(module, "time", Clock)
    made, profile = subscriber(services, transmitter([], []))
    stopping = asyncio.Event()
    running = asyncio.create_task(made.run(stopping))

    async def until(what: Callable[[], bool]) -> None:
        for _ in range(500):
            if what():
                return
            await asyncio.sleep(0.01)
        pytest.fail("timed out")

    try:
        await until(lambda: "partner-a" in made.subscriptions)
        settled = len(looks)
        await asyncio.sleep(0.6)  # idle: three looks of the old loop
        assert len(looks) == settled
        newer = build_profile(profile.document, [], version=2)
        services.federation.registry.replace_all([newer])
        await until(lambda: made.subscriptions["partner-a"].version == 2)
    finally:
        stopping.set()
        await asyncio.wait_for(running, 5)
