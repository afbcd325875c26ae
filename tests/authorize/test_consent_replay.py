"""One answer per authorization request: the consent form (``POST /authorize/consent`` with its
sealed ``request`` field) is single-use, on SQLite and PostgreSQL.

Posted again (the back button and a resubmit, a double click, a captured form replayed), racing
itself, rendered twice, or carried through a replayed login form, it answers once: one redirect
(the code, or ``access_denied``), and every other post the error page (400, no ``Location``) with
nothing written: no second code, mandate or consent event. Each of these tests got a second code
(or a second denial) from the old code.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from time import time as _real_time

import httpx
import pytest
from sqlalchemy import func, select

from tests.authorize.conftest import Setup
from tests.authorize.flow import PASSWORD, Flow, hidden_fields, query_of
from tests.authorize.test_par_jar import error_page
from trustplane.audit.sink import recent_events
from trustplane.authorize import http as authorize_http
from trustplane.authorize import sealing
from trustplane.authorize.store import authorization_codes
from trustplane.mandates.tables import mandate_versions
from trustplane.users.model import User

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: What answering writes, by audit event type (besides the code and mandate rows counted apart).
ANSWER_EVENTS = (
    "oauth:consent:granted",
    "oauth:code:issued",
    "oauth:consent:denied",
    "mandates:mandate:created",
)
#: What one approval by a person with no covering mandate writes; what one denial writes.
APPROVED = {"codes": 1, "mandates": 1, **dict.fromkeys(ANSWER_EVENTS[:2], 1), ANSWER_EVENTS[3]: 1}
DENIED = {ANSWER_EVENTS[2]: 1}
WRITTEN = {"approve": APPROVED, "deny": DENIED}
_users = Counter[str]()


async def fresh_user(setup: Setup, name: str) -> User:
    """A person of their own (no mandate yet), so that what one answer writes can be counted."""
    _users[name] += 1
    return await setup.add_user(f"{name}{_users[name]}")


async def written(setup: Setup, user: User) -> dict[str, int]:
    """The codes, mandate versions and answer events written for ``user`` (zeros left out)."""
    db = setup.server.services.db
    async with db.read() as conn:
        codes = await conn.scalar(
            select(func.count())
            .select_from(authorization_codes)
            .where(authorization_codes.c.user_id == user.user_id)
        )
        mandates = await conn.scalar(
            select(func.count())
            .select_from(mandate_versions)
            .where(mandate_versions.c.grantor_person == user.user_id)
        )
    counts = {"codes": int(codes or 0), "mandates": int(mandates or 0)}
    for type_ in ANSWER_EVENTS:
        events = await recent_events(db, 10_000, type_)
        counts[type_] = sum(1 for e in events if e["subject"] == user.user_id)
    return {k: v for k, v in counts.items() if v}


async def consent_page(setup: Setup, user: User) -> tuple[Flow, httpx.Response]:
    flow = setup.flow()
    page = await flow.login(await flow.start(), user.username)
    assert 'action="/authorize/consent"' in page.text, page.text
    return flow, page


def answered(response: httpx.Response, flow: Flow, decision: str) -> None:
    """The one authorization response: 303 to the client with the code, or ``access_denied``."""
    assert response.status_code == 303, response.text
    params = query_of(response.headers["location"])
    assert params["state"] == flow.state
    if decision == "approve":
        assert params["code"]
    else:
        assert params["error"] == "access_denied"


def refused(response: httpx.Response) -> None:
    """The second answer: the error page, never a second response to the client."""
    assert error_page(response) == (400, None)
    assert "already answered" in response.text


@pytest.mark.parametrize("second", ["approve", "deny"])
@pytest.mark.parametrize("first", ["approve", "deny"])
async def test_a_consent_form_posted_again_is_the_error_page_and_writes_nothing(
    setup: Setup, first: str, second: str
) -> None:
    """RFC 6749 §4.1.2 / §4.1.2.1: one authorization response per request. The old code answered
    every post of the form within its 600 s: a code (and a mandate) each time."""
    user = await fresh_user(setup, "resubmit")
    flow, page = await consent_page(setup, user)
    answered(await flow.decide(page, first), flow, first)
    refused(await flow.decide(page, second))
    assert await written(setup, user) == WRITTEN[first]


@pytest.mark.parametrize(
    "decisions",
    [["approve"] * 10, ["approve", "deny"] * 5],
    ids=["ten-approvals", "approvals-and-denials"],
)
async def test_racing_posts_of_one_consent_form_answer_once(
    setup: Setup, decisions: list[str]
) -> None:
    """Ten posts of one form at once (a double submit, a replay racing the person): exactly one
    answer, nine error pages, and only that answer's rows (one code and one mandate, or one
    denial). The old code issued ten codes, each with its own mandate."""
    user = await fresh_user(setup, "racer")
    flow, page = await consent_page(setup, user)
    responses = await asyncio.gather(*(flow.decide(page, d) for d in decisions))
    winners = [(r, d) for r, d in zip(responses, decisions, strict=True) if r.status_code == 303]
    assert len(winners) == 1, [r.status_code for r in responses]
    ((winner, decision),) = winners
    answered(winner, flow, decision)
    for response in responses:
        if response is not winner:
            refused(response)
    assert await written(setup, user) == WRITTEN[decision]


async def test_the_consent_page_rendered_again_is_still_one_request(setup: Setup) -> None:
    """Reloading the consent page (``GET /authorize/continue``) seals the same request again: its
    two forms answer once between them."""
    user = await fresh_user(setup, "reload")
    flow, page = await consent_page(setup, user)
    again = await flow.http.get(str(page.url))
    assert again.status_code == 200
    answered(await flow.decide(again, "approve"), flow, "approve")
    refused(await flow.decide(page, "approve"))
    assert await written(setup, user) == APPROVED


async def test_a_replayed_login_form_does_not_answer_the_request_again(setup: Setup) -> None:
    """A login form replayed with the cookie it was posted with logs the same person in again (a
    new session: the form carries the password itself), and the request it carries is the same
    request: its consent, from either session, answers once."""
    user = await fresh_user(setup, "relogin")
    flow = setup.flow()
    login_page = await flow.start()
    form = {**hidden_fields(login_page.text), "username": user.username, "password": PASSWORD}
    captured = dict(flow.http.cookies)
    page = await flow.login(login_page, user.username)

    transport = setup.server.http._transport
    async with httpx.AsyncClient(
        transport=transport, base_url=setup.server.issuer, cookies=captured
    ) as attacker:
        replayed = await attacker.post("/authorize/login", data=form)
        assert replayed.status_code == 303, replayed.text
        other = await attacker.get(replayed.headers["location"])
        assert 'action="/authorize/consent"' in other.text, other.text
        data = {**hidden_fields(other.text), "decision": "approve"}
        answered(await attacker.post("/authorize/consent", data=data), flow, "approve")
    refused(await flow.decide(page, "approve"))
    assert await written(setup, user) == APPROVED


class _TwoMinutesLater:
    """The clock of the sealing and page modules, two minutes on (a person slow to log in)."""

    @staticmethod
    def time() -> float:
        return _real_time() + 120


async def test_the_pending_request_keeps_its_deadline_through_login(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answered id is remembered until the request's deadline, so no form carrying it may
    outlive that: the login page's form and the consent page's after login expire together. The
    old code sealed the form again with a new 600 s at every page."""
    user = await fresh_user(setup, "slow")
    flow = setup.flow()
    login_page = await flow.start()
    monkeypatch.setattr(sealing, "time", _TwoMinutesLater)
    monkeypatch.setattr(authorize_http, "time", _TwoMinutesLater)
    page = await flow.login(login_page, user.username)
    sealer = setup.server.services.authorization.http._sealer
    before = sealer.open("request", hidden_fields(login_page.text)["request"])
    after = sealer.open("request", hidden_fields(page.text)["request"])
    assert before is not None
    assert after is not None
    assert after["_exp"] == before["_exp"]
