"""Login and consent pages: the session cookie, POST /authorize, TOTP at login, prompt=login, a
user disabled mid-session, lockout through the form; the audit trail of an approval; registration
rules for code-flow clients."""

from __future__ import annotations

import time

import pytest

from tests.authorize.conftest import Setup, register_code_client
from tests.authorize.flow import PASSWORD, REDIRECT_URI, hidden_fields, query_of
from trustplane.audit.sink import recent_events
from trustplane.errors import OAuth2Error
from trustplane.protocol.tokens import read_access_token
from trustplane.users import totp
from trustplane.users.model import UserStatus

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_session_cookie_attributes_on_loopback_http(setup: Setup) -> None:
    response = await setup.flow().start()
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("trustplane_session=")
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=lax", "path=/"} <= attributes
    assert "secure" not in attributes  # plain http is only allowed on loopback


async def test_authorize_accepts_a_form_post(setup: Setup) -> None:
    flow = setup.flow()
    response = await flow.http.post("/authorize", data=flow.params())
    assert response.status_code == 200
    assert 'action="/authorize/login"' in response.text
    bad = await flow.http.post("/authorize", data=flow.params(code_challenge_method="plain"))
    assert bad.status_code == 303  # RFC 9700: a redirect after a POST is a 303
    assert query_of(bad.headers["location"])["error"] == "invalid_request"


async def test_every_post_answers_303(setup: Setup) -> None:
    flow = setup.flow()
    page = await flow.start()
    login = await flow.http.post(
        "/authorize/login",
        data={**hidden_fields(page.text), "username": "alice", "password": PASSWORD},
    )
    assert login.status_code == 303
    assert login.headers["location"].startswith("/authorize/continue?request=")
    assert "trustplane_session=" in login.headers["set-cookie"]  # a new session id at login
    consent = await flow.http.get(login.headers["location"])
    decided = await flow.decide(consent)
    assert decided.status_code == 303


async def test_totp_user_needs_the_one_time_code(setup: Setup) -> None:
    users = setup.server.services.authorization.users
    await setup.add_user("tom")
    enrolment = await users.enable_totp("tom")
    flow = setup.flow()
    page = await flow.login(await flow.start(), "tom")  # the right password: the code page
    assert 'name="otp"' in page.text
    assert 'id="login-failed"' not in page.text
    page = await flow.otp(page, "000000" if totp.now_code(enrolment.secret) != "000000" else "1")
    assert 'id="login-failed"' in page.text
    assert 'name="otp"' in page.text  # still the code page: no need to type the password again
    page = await flow.otp(page, totp.now_code(enrolment.secret))
    assert 'action="/authorize/consent"' in page.text
    answer = await flow.decide(page)
    code = query_of(answer.headers["location"])["code"]
    body = (await setup.token(flow.redeem_form(code))).json()
    claims = read_access_token(
        setup.server.services.keys.ring, body["access_token"], issuer=setup.server.issuer
    )
    assert claims is not None
    assert claims["acr"] == "urn:trustplane:acr:password+totp"


async def test_prompt_login_asks_again_despite_a_session(setup: Setup) -> None:
    flow = setup.flow()
    await flow.code("alice")  # the browser now has a session
    assert 'action="/authorize/consent"' in (await flow.start()).text
    forced = await flow.start(prompt="login")
    assert 'action="/authorize/login"' in forced.text
    after = await flow.login(forced, "alice")
    assert 'action="/authorize/consent"' in after.text


async def test_user_disabled_mid_session_cannot_consent(setup: Setup) -> None:
    users = setup.server.services.authorization.users
    await setup.add_user("dora")
    flow = setup.flow()
    page = await flow.login(await flow.start(), "dora")
    await users.set_status("dora", UserStatus.DISABLED)
    answer = await flow.decide(page)
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/authorize/continue?")  # back to login
    again = await flow.http.get(answer.headers["location"])
    assert 'action="/authorize/login"' in again.text


async def test_lockout_through_the_login_form(setup: Setup) -> None:
    await setup.add_user("lena")
    flow = setup.flow()
    page = await flow.start()
    for _ in range(setup.server.services.settings.login_max_failures):
        page = await flow.login(page, "lena", password="not the password")
    page = await flow.login(page, "lena")  # right password, but locked now
    assert 'id="login-failed"' in page.text
    user = await setup.server.services.authorization.users.get("lena")
    assert user.locked_until > time.time()


async def test_approval_is_audited_with_the_mandate(setup: Setup) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    body = (await setup.token(flow.redeem_form(code))).json()
    claims = read_access_token(
        setup.server.services.keys.ring, body["access_token"], issuer=setup.server.issuer
    )
    assert claims is not None
    db = setup.server.services.db
    issued = [
        e for e in await recent_events(db, type_="oauth:token:issued") if e["jti"] == claims["jti"]
    ]
    assert len(issued) == 1
    assert issued[0]["mandate_id"] == claims["mandate"]["id"]
    assert issued[0]["mandate_version"] == claims["mandate"]["version"]
    assert issued[0]["authorization_details_digest"]
    assert issued[0]["payload"]["grant_type"] == "authorization_code"
    code_issued = (await recent_events(db, type_="oauth:code:issued", limit=1))[0]
    assert code_issued["subject"] == setup.user.user_id
    assert code_issued["mandate_id"] == claims["mandate"]["id"]
    granted = (await recent_events(db, type_="oauth:consent:granted", limit=1))[0]
    assert granted["client_id"] == setup.kit.client_id


async def test_reuse_is_audited_with_what_was_revoked(setup: Setup) -> None:
    flow = setup.flow()
    code = await flow.code("alice")
    first = (await setup.token(flow.redeem_form(code))).json()
    await setup.token(flow.redeem_form(code))
    jti = read_access_token(
        setup.server.services.keys.ring, first["access_token"], issuer=setup.server.issuer
    )["jti"]  # type: ignore[index]
    event = (await recent_events(setup.server.services.db, type_="oauth:code:reused", limit=1))[0]
    assert jti in event["payload"]["revoked_jtis"]
    assert event["payload"]["family_id"]


@pytest.mark.parametrize(
    ("metadata", "error", "message"),
    [
        ({"redirect_uris": []}, "invalid_client_metadata", "needs redirect_uris"),
        ({"response_types": ["token"]}, "invalid_client_metadata", "only 'code'"),
        (
            {"grant_types": ["refresh_token", "client_credentials"]},
            "invalid_client_metadata",
            "only issued with",
        ),
        ({"redirect_uris": ["https://client.example/*"]}, "invalid_redirect_uri", "wildcard"),
    ],
)
async def test_code_flow_client_registration_rules(
    setup: Setup, metadata: dict[str, object], error: str, message: str
) -> None:
    with pytest.raises(OAuth2Error, match=message) as info:
        await register_code_client(setup.server, **metadata)
    assert info.value.error == error


async def test_missing_redirect_uri_uses_the_only_registered_one(setup: Setup) -> None:
    kit = await register_code_client(setup.server, redirect_uris=[REDIRECT_URI])
    flow = setup.flow(kit)
    code = await flow.code("alice", redirect_uri=None)
    # not sent at /authorize: may be omitted at /token, or sent and equal
    form = flow.redeem_form(code, redirect_uri=None)
    response = await setup.token(form, kit=kit)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "order:create"
