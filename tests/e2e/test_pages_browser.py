"""The login, one-time-code, consent and error pages in a real browser (Debian's Chromium, driven by
Playwright for Python) against a real ``trustplane serve`` on loopback, at 1280 and 390 px wide.

Each page: no horizontal overflow, the operator's name shown, errors in a ``role="alert"`` box, the
username kept after a failed login, the one-time-code field only for an enrolled user after the right
password, Approve as the primary button, the LEIs shown with their legal names. Screenshots go to
``tests/e2e/screenshots/`` (git-ignored) for a person to look at.

Locally the tests skip when ``/usr/bin/chromium`` or Playwright is missing; with ``CI=true`` they
fail instead (``.ci/run`` installs the ``chromium`` package).
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.authorize.flow import PASSWORD, TRADE, pkce_pair
from tests.conftest import IN_CI, LEI, ClientKit
from tests.e2e.conftest import TRUSTPLANE, LiveServer, running_servers
from tests.e2e.test_authorization_flow import (
    USER_LEI,
    add_user,
    authorize_url,
    register_code_client,
)
from trustplane.users import totp

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.e2e
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).parent / "screenshots"
GOLDEN_COPY = Path(__file__).parents[1] / "entities" / "fixtures" / "golden_copy_sample.csv"
OPERATOR = "Northbridge Clearing Services Ltd"
CLIENT_ENTITY = "Arranger Securities Europe S.A."  # as in the golden-copy sample
USER_ENTITY = "Meridian Asset Management GmbH"
WIDTHS = [1280, 390]


@dataclass
class Site:
    server: LiveServer
    kit: ClientKit
    #: TOTP seed of user ``tom``
    seed: str


def _require_browser() -> None:
    missing = [
        what
        for what, present in (
            (str(CHROMIUM), CHROMIUM.exists()),
            ("playwright", importlib.util.find_spec("playwright") is not None),
        )
        if not present
    ]
    if not missing:
        return
    message = f"browser tests need {' and '.join(missing)} (apt-get install chromium; pip install -e '.[dev]')"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: browser tests are required, not skipped)")
    pytest.skip(message)


def import_entities(server: LiveServer) -> None:
    """``trustplane entities import`` of the golden-copy sample."""
    proc = subprocess.run(
        [TRUSTPLANE, "entities", "import", str(GOLDEN_COPY)],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A server with a client, alice, tom (with an authenticator) and both LEIs in the entity
    directory (from the golden-copy sample)."""
    _require_browser()
    with running_servers(tmp_path_factory.mktemp("pages")) as servers:
        server = servers.start(operator_name=OPERATOR)
        add_user(server, "alice")
        add_user(server, "tom")
        seed = server.cli_json("users", "enable-totp", "tom")["secret"]
        import_entities(server)
        yield Site(server, register_code_client(server), seed)


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(params=WIDTHS, ids=[f"{w}px" for w in WIDTHS])
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (no cookies) at this width; the client's redirect URI answered by
    the test (nothing leaves the machine)."""
    context = browser.new_context(viewport={"width": request.param, "height": 900})
    context.route(
        "https://client.example/**",
        lambda route: route.fulfill(status=200, content_type="text/plain", body="client callback"),
    )
    opened = context.new_page()
    opened.width = request.param  # type: ignore[attr-defined]
    try:
        yield opened
    finally:
        context.close()


def start(page: Page, site: Site) -> None:
    _, challenge = pkce_pair()
    page.goto(authorize_url(site.server, site.kit, challenge, "state-1", [TRADE]))


def check_layout(page: Page, name: str) -> None:
    """No horizontal overflow, the operator named; a full-page screenshot for a person to review."""
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}-{page.width}.png", full_page=True)  # type: ignore[attr-defined]
    scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll <= inner, f"{name}: {scroll} px of content in a {inner} px wide window"
    assert page.locator("#operator").inner_text().startswith(OPERATOR)


def log_in(page: Page, username: str, password: str = PASSWORD) -> None:
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("button[type=submit]")


def test_login_page(page: Page, site: Site) -> None:
    start(page, site)
    check_layout(page, "login")
    assert page.locator("#client-name").inner_text() == "Arranger Order Service"
    assert page.locator("#client-lei-name").inner_text() == CLIENT_ENTITY
    assert page.locator("#client-lei").inner_text() == f"LEI {LEI}"
    assert page.locator("#otp").count() == 0  # nobody has said who they are yet
    assert page.locator("[role=alert]").count() == 0


def test_failed_login_keeps_the_username_and_announces_the_error(page: Page, site: Site) -> None:
    start(page, site)
    log_in(page, "alice", "not the password")
    check_layout(page, "login-failed")
    alert = page.locator("[role=alert]")
    assert alert.count() == 1
    assert "wrong" in alert.inner_text()
    assert page.input_value("#username") == "alice"
    assert page.input_value("#password") == ""
    assert page.evaluate("document.activeElement.id") == "password"


def test_a_wrong_password_looks_the_same_with_and_without_an_authenticator(
    page: Page, site: Site
) -> None:
    seen = []
    for username in ("alice", "tom"):
        start(page, site)
        log_in(page, username, "not the password")
        body = page.locator("main").inner_text().replace(username, "USER")
        seen.append((body, page.locator("#otp").count(), page.input_value("#username")))
    assert seen[0][:2] == seen[1][:2]
    assert seen[0][1] == 0  # no code field for anyone before the password is right


def test_one_time_code_step_only_after_the_right_password(page: Page, site: Site) -> None:
    # a code is accepted once: each width uses another time step within the drift window (the
    # current one at 1280, the next one at 390), so both pass whatever the clock does in between
    offset = 30 if page.width == 390 else 0  # type: ignore[attr-defined]
    start(page, site)
    log_in(page, "tom")
    check_layout(page, "login-otp")
    assert page.locator("#otp").is_visible()
    assert page.locator("#password").count() == 0
    wrong = "000000" if totp.now_code(site.seed, time.time() + offset) != "000000" else "111111"
    page.fill("#otp", wrong)
    page.click("button.primary")
    check_layout(page, "login-otp-failed")
    assert "wrong" in page.locator("[role=alert]").inner_text()
    page.fill("#otp", totp.now_code(site.seed, time.time() + offset))
    page.click("button.primary")
    assert page.locator("#approve").is_visible()


def test_consent_page(page: Page, site: Site) -> None:
    start(page, site)
    log_in(page, "alice")
    check_layout(page, "consent")
    buttons = page.locator("form[action='/authorize/consent'] button")
    assert buttons.nth(0).inner_text() == "Approve"
    assert page.locator("button.primary").inner_text() == "Approve"
    assert page.locator("button.secondary").inner_text() == "Deny"
    assert page.locator("#client-lei-name").inner_text() == CLIENT_ENTITY
    assert page.locator("#client-lei").inner_text() == f"LEI {LEI}"
    assert page.locator("#grantor-lei-name").inner_text() == USER_ENTITY
    assert page.locator("#grantor-lei").inner_text() == f"LEI {USER_LEI}"
    assert USER_ENTITY in page.locator("h1").inner_text()
    scopes = page.locator("#scopes li").all_inner_texts()
    assert scopes == ["Create an order order:create"]  # the label first, the scope string after
    details = page.locator(".details").inner_text()
    assert "Create orders" in details
    assert "EUR 5,000,000.00" in details
    with page.expect_response("https://client.example/**") as callback:
        page.click("#approve")
    params = httpx.URL(callback.value.url).params
    assert params["state"] == "state-1"
    assert params["code"]


def test_error_page(page: Page, site: Site) -> None:
    page.goto(f"{site.server.base_url}/authorize?client_id=nobody&response_type=code")
    check_layout(page, "error")
    alert = page.locator("[role=alert]")
    assert alert.count() == 1
    assert alert.inner_text()


def test_docs_render_offline(page: Page, site: Site) -> None:
    """Swagger UI renders the OpenAPI document with every request answered by this server (its
    operations listener)."""
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(httpx.URL(request.url).host))
    page.goto(f"{site.server.ops_url}/docs")  # the operations listener serves the docs
    title = page.locator(".swagger-ui .info .title")
    title.wait_for(timeout=60_000)
    assert title.inner_text().startswith("trustplane")
    assert page.locator(".opblock").count() > 10  # the operations are listed
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"docs-{page.width}.png")  # type: ignore[attr-defined]
    assert hosts == {"127.0.0.1"}


def test_index_page(page: Page, site: Site) -> None:
    page.goto(site.server.base_url + "/")
    check_layout(page, "index")
    links = page.locator("main a")
    assert links.all_inner_texts() == [
        "Authorization server metadata",
        "Public signing keys (JWKS)",
    ]  # the API documentation is on the operations listener
