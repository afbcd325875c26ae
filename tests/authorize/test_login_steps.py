"""The login pages: the one-time code on a second page only after the right password, a wrong
password answered alike for enrolled and non-enrolled users, the username kept (in the sealed cookie,
not the URL), the code page's expiry and restart; what the pages show (operator, legal names,
labels before identifiers)."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.authorize.conftest import USER_LEI, Setup
from tests.authorize.flow import PASSWORD, hidden_fields
from tests.conftest import LEI
from trustplane.authorize import http as authorize_http
from trustplane.users import totp

pytestmark = pytest.mark.asyncio(loop_scope="module")
_VARYING = re.compile(r'value="[^"]*"|LEI [0-9A-Z]{20}|tp-[\w-]+')


async def post_login(
    flow_http: httpx.AsyncClient, page: httpx.Response, **fields: str
) -> httpx.Response:
    return await flow_http.post("/authorize/login", data={**hidden_fields(page.text), **fields})


async def enrolled(setup: Setup, name: str) -> str:
    await setup.add_user(name)
    return (await setup.server.services.authorization.users.enable_totp(name)).secret


def wrong_code(seed: str) -> str:
    return "000000" if totp.now_code(seed) != "000000" else "111111"


async def test_a_wrong_password_is_answered_alike_with_and_without_an_authenticator(
    setup: Setup,
) -> None:
    await enrolled(setup, "wendy")
    await setup.add_user("walter")
    answers = []
    for name in ("wendy", "walter", "nobody-at-all"):
        flow = setup.flow()
        page = await flow.start()
        posted = await post_login(flow.http, page, username=name, password="not the password")
        assert posted.status_code == 303
        assert posted.headers["location"].endswith("&failed=1")
        shown = await flow.http.get(posted.headers["location"])
        assert 'name="otp"' not in shown.text
        assert 'role="alert"' in shown.text
        answers.append(_VARYING.sub("", shown.text.replace(name, "NAME")))
    assert answers[0] == answers[1] == answers[2]


async def test_the_username_is_kept_in_the_cookie_not_the_url(setup: Setup) -> None:
    flow = setup.flow()
    page = await flow.start()
    posted = await post_login(flow.http, page, username="alice", password="not the password")
    assert "alice" not in posted.headers["location"]
    shown = await flow.http.get(posted.headers["location"])
    assert 'id="username" name="username" required' in shown.text
    assert 'value="alice"' in shown.text
    assert 'id="password" name="password" required autocomplete="current-password" autofocus' in (
        shown.text
    )
    other = setup.flow()  # another browser with the same link sees an empty form
    assert 'value="alice"' not in (await other.http.get(posted.headers["location"])).text


async def test_the_code_page_comes_only_after_the_right_password(setup: Setup) -> None:
    seed = await enrolled(setup, "olga")
    flow = setup.flow()
    page = await flow.start()
    assert 'name="otp"' not in page.text
    page = await flow.login(page, "olga")
    assert 'name="otp"' in page.text
    assert 'name="password"' not in page.text
    page = await flow.otp(page, wrong_code(seed))
    assert 'role="alert"' in page.text
    assert 'name="otp"' in page.text
    code = totp.now_code(seed)
    page = await flow.otp(page, code)
    assert 'action="/authorize/consent"' in page.text
    # the same code again, in another browser: refused (the code itself, not a fresh now_code(),
    # which is another code once the 30 s step has turned on a slow machine)
    replayed = setup.flow()
    again = await replayed.login(await replayed.start(), "olga")
    again = await replayed.otp(again, code)
    assert 'id="login-failed"' in again.text


async def test_the_code_page_of_one_browser_is_useless_in_another(setup: Setup) -> None:
    seed = await enrolled(setup, "bruno")
    first = setup.flow()
    page = await first.login(await first.start(), "bruno")
    thief = setup.flow()
    stolen = await thief.http.post(
        "/authorize/login", data={**hidden_fields(page.text), "otp": totp.now_code(seed)}
    )
    assert stolen.status_code == 403
    assert 'id="error"' in stolen.text  # another session: the CSRF token does not match


async def test_wrong_codes_count_towards_the_lockout(setup: Setup) -> None:
    seed = await enrolled(setup, "lotte")
    flow = setup.flow()
    page = await flow.login(await flow.start(), "lotte")
    for _ in range(setup.server.services.settings.login_max_failures):
        page = await flow.otp(page, wrong_code(seed))
    page = await flow.otp(page, totp.now_code(seed))  # the right code, but locked now
    assert 'id="login-failed"' in page.text
    user = await setup.server.services.authorization.users.get("lotte")
    assert user.locked_until > 0


async def test_an_expired_code_page_asks_for_the_password_again(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = await enrolled(setup, "eve")
    monkeypatch.setattr(authorize_http, "LOGIN_STEP_LIFETIME", 0)
    flow = setup.flow()
    page = await flow.login(await flow.start(), "eve")
    assert 'name="otp"' not in page.text  # already expired: the password page
    posted = await flow.http.post(
        "/authorize/login",
        data={**hidden_fields(page.text), "stage": "otp", "otp": totp.now_code(seed)},
    )
    assert posted.headers["location"].endswith("&failed=expired")
    shown = await flow.http.get(posted.headers["location"])
    assert "ran out" in shown.text
    assert 'name="password"' in shown.text


async def test_restart_leaves_the_code_page(setup: Setup) -> None:
    await enrolled(setup, "rita")
    flow = setup.flow()
    page = await flow.login(await flow.start(), "rita")
    restart = page.text.split("</form>")[1]
    posted = await flow.http.post("/authorize/login", data=hidden_fields(restart))
    assert posted.status_code == 303
    shown = await flow.http.get(posted.headers["location"])
    assert 'name="password"' in shown.text
    assert 'role="alert"' not in shown.text


async def test_the_pages_show_the_operator_and_legal_names(setup: Setup) -> None:
    entities = setup.server.services.authorization.entities
    flow = setup.flow()
    page = await flow.start()
    host = httpx.URL(setup.server.issuer).host
    assert f'<p id="operator">{host}<small>' in page.text  # no operator_name: the issuer's host
    assert "Legal entity not in this service&#39;s directory" in page.text
    await entities.add(LEI, "Arranger Securities Europe S.A.", "LU", "ISSUED")
    await entities.add(USER_LEI, "Meridian Asset Management GmbH", "DE", "LAPSED")
    page = await flow.start()
    assert '<span id="client-lei-name">Arranger Securities Europe S.A.</span>' in page.text
    consent = await flow.login(page, "alice")
    text = consent.text
    assert '<span id="grantor-lei-name">Meridian Asset Management GmbH</span>' in text
    assert "LEI registration status: lapsed" in text
    assert 'Create orders <span class="code">create_order</span>' in text  # label, then code
    assert 'Create an order <span class="code">order:create</span>' in text
    assert text.index('id="approve"') < text.index('id="deny"')
    assert 'class="primary" name="decision" value="approve"' in text


async def test_a_client_disabled_while_on_the_page_gets_the_error_page(setup: Setup) -> None:
    from tests.authorize.conftest import register_code_client
    from trustplane.clients.model import ClientStatus

    kit = await register_code_client(setup.server)
    flow = setup.flow(kit)
    page = await flow.start()
    await setup.server.services.clients.set_status(kit.client_id, ClientStatus.DISABLED)
    posted = await post_login(flow.http, page, username="alice", password="not the password")
    shown = await flow.http.get(posted.headers["location"])
    assert shown.status_code == 400
    assert 'role="alert"' in shown.text
    assert PASSWORD not in shown.text
