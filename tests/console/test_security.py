"""Console security: every mutating route for each role (allowed or 403, and a 403 changes nothing
and is recorded), CSRF refusals, the confirmation step, the headers, sign-out and the session's end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import pytest

from tests.conftest import KEK
from tests.console.conftest import Console, sign_in
from tests.console.targets import new_bundle, new_client, new_mandate, new_partner
from trustplane.app import Services
from trustplane.authorize.sealing import Sealer
from trustplane.settings import decode_kek
from trustplane.users.model import UserStatus

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class Route:
    """A mutating console route: the role it needs, how to make a fresh target, what to post."""

    name: str
    role: str
    path: Callable[[str], str]
    target: Callable[[Services], Awaitable[str]]
    form: Callable[[str], dict[str, str]]


def _reason(_: str) -> dict[str, str]:
    return {"confirmed": "yes", "reason": "matrix test"}


def _version(target: str) -> dict[str, str]:
    return {"confirmed": "yes", "reason": "matrix test", "version": target}


async def _nothing(_: Services) -> str:
    return ""


async def _suspended_mandate(svc: Services) -> str:
    mandate_id = await new_mandate(svc)
    await svc.mandates.suspend(mandate_id, actor="test", reason="setup")
    return mandate_id


async def _disabled_client(svc: Services) -> str:
    from trustplane.clients.model import ClientStatus

    client_id = await new_client(svc)
    await svc.clients.set_status(client_id, ClientStatus.DISABLED)
    return client_id


_PARTNERS = iter(range(1000))


async def _partner(svc: Services) -> str:
    return await new_partner(svc, f"partner-{next(_PARTNERS)}")


async def _bundle(svc: Services) -> str:
    return await new_bundle(svc, f"b{next(_PARTNERS)}")


async def _active_bundle(svc: Services) -> str:
    version = await _bundle(svc)
    await svc.policy.activate(version, "test", "setup")
    return version


ROUTES = [
    Route("mandate suspend", "operator", lambda t: f"/console/mandates/{t}/suspend", new_mandate, _reason),
    Route("mandate resume", "operator", lambda t: f"/console/mandates/{t}/resume", _suspended_mandate, _reason),
    Route("mandate revoke", "operator", lambda t: f"/console/mandates/{t}/revoke", new_mandate, _reason),
    Route("client disable", "operator", lambda t: f"/console/clients/{t}/disable", new_client, _reason),
    Route("client enable", "operator", lambda t: f"/console/clients/{t}/enable", _disabled_client, _reason),
    Route("partner disable", "operator", lambda t: f"/console/partners/{t}/disable", _partner, _reason),
    Route("partner conformance", "operator", lambda t: f"/console/partners/{t}/conformance", _partner,
          lambda _: {"metadata_url": "https://partner.invalid/.well-known/openid-configuration"}),
    Route("keys rotate", "operator", lambda _: "/console/keys/rotate", _nothing, _reason),
    Route("policy activate", "compliance", lambda _: "/console/policy/activate", _bundle, _version),
    Route("policy rollback", "compliance", lambda _: "/console/policy/rollback", _active_bundle, _version),
    Route("policy simulate", "compliance", lambda _: "/console/policy/simulate", _bundle, _version),
]  # fmt: skip
ROLES = {"operator": "olivia", "compliance": "carl", "auditor": "ada"}


async def _console_events(svc: Services, user_id: str, type_: str) -> list[str]:
    await svc.ledger.integrate_all()
    _, found = await svc.ledger.search({"subject": user_id, "type": type_}, 0, 1000)
    return [orjson.loads(p.entry.payload)["action"] for p in found if p.entry.payload is not None]


async def _user_id(svc: Services, username: str) -> str:
    return (await svc.authorization.users.get(username)).user_id


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("route", ROUTES, ids=[r.name for r in ROUTES])
async def test_each_role_on_each_mutating_route(console: Console, route: Route, role: str) -> None:
    svc = console.services
    agent = console.agents[ROLES[role]]
    target = await route.target(svc)
    data = {"csrf": await console.csrf(agent), **route.form(target)}
    answer = await agent.post(route.path(target), data=data)
    user_id = await _user_id(svc, ROLES[role])
    action = route.name.replace(" ", ":")
    if role == route.role:
        assert answer.status_code in (200, 303), answer.text
        assert "does not allow" not in answer.text
        performed = await _console_events(svc, user_id, "console:action:performed")
        assert action in performed
    else:
        assert answer.status_code == 403, answer.text
        assert "role" in answer.text
        refused = await _console_events(svc, user_id, "console:action:refused")
        assert action in refused


async def test_a_refused_role_changes_nothing(console: Console) -> None:
    svc = console.services
    mandate_id = await new_mandate(svc)
    agent = console.agents["ada"]
    data = {"csrf": await console.csrf(agent), "confirmed": "yes", "reason": "auditor tries"}
    answer = await agent.post(f"/console/mandates/{mandate_id}/revoke", data=data)
    assert answer.status_code == 403
    assert (await svc.mandates.get(mandate_id)).status.value == "active"


@pytest.mark.parametrize(
    "csrf", [None, "", "wrong", "other-session"], ids=["missing", "empty", "wrong", "foreign"]
)
async def test_csrf_refused_with_403_and_nothing_changes(
    console: Console, csrf: str | None
) -> None:
    svc = console.services
    mandate_id = await new_mandate(svc)
    agent = console.agents["olivia"]
    data = {"confirmed": "yes", "reason": "csrf test"}
    if csrf == "other-session":  # a valid token, but of another person's session
        data["csrf"] = await console.csrf(console.agents["carl"])
    elif csrf is not None:
        data["csrf"] = csrf
    answer = await agent.post(f"/console/mandates/{mandate_id}/revoke", data=data)
    assert answer.status_code == 403
    assert "expired or was not sent from this console" in answer.text
    assert (await svc.mandates.get(mandate_id)).status.value == "active"


async def test_csrf_on_logout_too(console: Console) -> None:
    agent = console.agents["ada"]
    answer = await agent.post("/console/logout", data={"csrf": "wrong"})
    assert answer.status_code == 403
    assert (await agent.get("/console")).status_code == 200  # still signed in


async def test_destructive_actions_need_the_confirmation_step(console: Console) -> None:
    svc = console.services
    mandate_id = await new_mandate(svc)
    agent = console.agents["olivia"]
    page = await agent.get(f"/console/confirm?action=mandate:revoke&target={mandate_id}")
    assert page.status_code == 200
    assert f'action="/console/mandates/{mandate_id}/revoke"' in page.text
    data = {"csrf": await console.csrf(agent), "reason": "no confirmation"}
    answer = await agent.post(f"/console/mandates/{mandate_id}/revoke", data=data)
    assert answer.status_code == 200  # the confirmation page again
    assert 'id="confirm-form"' in answer.text
    assert (await svc.mandates.get(mandate_id)).status.value == "active"


async def test_revoke_needs_a_reason(console: Console) -> None:
    svc = console.services
    mandate_id = await new_mandate(svc)
    agent = console.agents["olivia"]
    data = {"csrf": await console.csrf(agent), "confirmed": "yes", "reason": "  "}
    answer = await agent.post(f"/console/mandates/{mandate_id}/revoke", data=data)
    assert answer.status_code == 200
    assert "Give a reason" in answer.text
    assert (await svc.mandates.get(mandate_id)).status.value == "active"


async def test_revoke_is_done_by_the_mandate_service_and_names_the_person(console: Console) -> None:
    svc = console.services
    mandate_id = await new_mandate(svc)
    agent = console.agents["olivia"]
    user_id = await _user_id(svc, "olivia")
    data = {"csrf": await console.csrf(agent), "confirmed": "yes", "reason": "client compromised"}
    answer = await agent.post(f"/console/mandates/{mandate_id}/revoke", data=data)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/console/mandates/{mandate_id}?done=mandate%3Arevoke"
    history = await svc.mandates.history(mandate_id)
    last = history.changes[-1]
    assert (last.action.value, last.actor, last.reason) == (
        "revoked",
        user_id,
        "client compromised",
    )
    await svc.ledger.integrate_all()
    _, found = await svc.ledger.search(
        {"subject": user_id, "type": "console:action:performed"}, 0, 1000
    )
    payloads = [orjson.loads(p.entry.payload) for p in found if p.entry.payload]
    mine = [p for p in payloads if p["target"] == mandate_id]
    assert mine == [
        {
            "action": "mandate:revoke",
            "target": mandate_id,
            "person": "Olivia",
            "roles": ["operator"],
            "why": "client compromised",
        }
    ]
    page = await agent.get(f"/console/mandates/{mandate_id}?done=mandate:revoke")
    assert "The mandate is revoked." in page.text
    assert 'id="status">revoked' in page.text
    history = page.text.split('id="history"', 1)[1]
    assert f'Olivia<span class="sub code">{user_id}</span>' in history  # named, with the id


async def test_every_page_has_the_security_headers(console: Console) -> None:
    agent = console.agents["ada"]
    for path in ("/console", "/console/mandates", "/console/audit", "/console/login"):
        answer = await agent.get(path)
        csp = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["cache-control"] == "no-store"
    page = await agent.get("/console")
    assert "<script>" not in page.text
    assert "style=" not in page.text
    assert '<script src="/console/static/console.js" defer></script>' in page.text


async def test_anonymous_requests_go_to_sign_in_and_change_nothing(console: Console) -> None:
    svc = console.services
    mandate_id = await new_mandate(svc)
    async with console.agent() as anonymous:
        for path in ("/console", "/console/audit", "/console/mandates"):
            answer = await anonymous.get(path)
            assert answer.status_code == 303
            assert answer.headers["location"] == "/console/login"
        posted = await anonymous.post(
            f"/console/mandates/{mandate_id}/revoke", data={"confirmed": "yes", "reason": "x"}
        )
        assert posted.status_code == 303
    assert (await svc.mandates.get(mandate_id)).status.value == "active"


async def test_a_person_without_a_role_is_refused_at_sign_in(console: Console) -> None:
    async with console.agent() as agent:
        answer = await sign_in(agent, "nobody")
        assert answer.status_code == 403
        assert "no console role" in answer.text
        assert "trustplane_console=" not in answer.headers.get("set-cookie", "").replace(
            "trustplane_console_login", ""
        )
        assert (await agent.get("/console")).status_code == 303


async def test_a_denied_consent_signs_nobody_in(console: Console) -> None:
    async with console.agent() as agent:
        answer = await sign_in(agent, "olivia", approve=False)
        assert answer.status_code == 403
        assert "access_denied" in answer.text
        assert (await agent.get("/console")).status_code == 303


async def test_the_callback_refuses_a_foreign_state(console: Console) -> None:
    async with console.agent() as agent:
        start = await agent.get("/console/login")
        assert start.status_code == 303
        answer = await agent.get(
            "/console/callback?code=abc&state=not-mine&iss=" + console.server.issuer
        )
        assert answer.status_code == 400
        assert (await agent.get("/console")).status_code == 303


async def test_sign_out_ends_the_session(console: Console) -> None:
    async with console.agent() as agent:
        assert (await sign_in(agent, "dora")).status_code == 303
        assert (await agent.get("/console")).status_code == 200
        answer = await agent.post("/console/logout", data={"csrf": await console.csrf(agent)})
        assert answer.status_code == 200
        assert "You are signed out" in answer.text
        assert (await agent.get("/console")).status_code == 303
        user_id = await _user_id(console.services, "dora")
        actions = await _console_events(console.services, user_id, "console:session:ended")
        assert actions == ["session:end"]
        assert "session:start" in await _console_events(
            console.services, user_id, "console:session:started"
        )


async def test_an_expired_session_is_not_accepted(console: Console) -> None:
    sealer = Sealer(decode_kek(KEK))
    user_id = await _user_id(console.services, "olivia")
    data = {"sid": "s1", "uid": user_id, "roles": ["operator"], "at": 0}
    async with console.agent() as agent:
        agent.cookies.set("trustplane_console", sealer.seal("console-session", data, 0))
        assert (await agent.get("/console")).status_code == 303
        agent.cookies.set("trustplane_console", sealer.seal("console-session", data, 60))
        assert (await agent.get("/console")).status_code == 200  # the same, not yet expired


async def test_a_disabled_account_loses_the_console_at_once(console: Console) -> None:
    users = console.services.authorization.users
    async with console.agent() as agent:
        assert (await sign_in(agent, "dora")).status_code == 303
        await users.set_status("dora", UserStatus.DISABLED)
        try:
            answer = await agent.get("/console")
            assert answer.status_code == 403
            assert "disabled" in answer.text
        finally:
            await users.set_status("dora", UserStatus.ACTIVE)


async def test_roles_not_granted_in_the_flow_are_not_held(console: Console) -> None:
    """A session whose granted scopes lack the configured role does not get it (both must hold)."""
    sealer = Sealer(decode_kek(KEK))
    user_id = await _user_id(console.services, "olivia")
    data = {"sid": "s2", "uid": user_id, "roles": ["auditor"], "at": 0}  # olivia: operator only
    async with console.agent() as agent:
        agent.cookies.set("trustplane_console", sealer.seal("console-session", data, 60))
        answer = await agent.get("/console")
        assert answer.status_code == 403
        assert "no console role" in answer.text


async def test_static_files(console: Console) -> None:
    async with console.agent() as agent:
        css = await agent.get("/console/static/console.css")
        assert css.status_code == 200
        assert css.headers["content-type"].startswith("text/css")
        assert (await agent.get("/console/static/other.js")).status_code == 404


async def test_the_console_client_is_registered_once_with_only_its_own_audience(
    console: Console,
) -> None:
    svc = console.services
    mine = [
        c for c in await svc.clients.list() if c.metadata.get("client_name") == "trustplane console"
    ]
    assert len(mine) == 1  # started, and signed in several times
    meta = mine[0].metadata
    assert meta["allowed_resources"] == [f"{svc.settings.issuer}/console"]
    assert meta["redirect_uris"] == [f"{svc.settings.issuer}/console/callback"]
    assert meta["grant_types"] == ["authorization_code"]
    assert meta["token_endpoint_auth_method"] == "private_key_jwt"
