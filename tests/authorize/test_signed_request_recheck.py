"""``require_signed_request_object`` (RFC 9101 §10.5) turned on after a request was pushed or while
it waits on the consent page: the request is checked again (RFC 9126 §4: a check done at the push
may be skipped only while the registration has not changed in a way that affects it). A pushed
request records whether it came in a verified request object; an unsigned one is refused with the
redirect ``/authorize`` gives a plain request (``invalid_request``, with ``state`` and ``iss``), a
signed one goes on. On SQLite and PostgreSQL. The old code led both unsigned cases on to a code.
"""

from __future__ import annotations

import pytest

from tests.authorize.conftest import Setup, register_code_client
from tests.authorize.flow import REDIRECT_URI, Flow, query_of
from tests.authorize.test_conformance import narrow_registration, redirected
from tests.authorize.test_par_jar import push, request_object
from tests.conftest import ClientKit

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def pushed(setup: Setup, kit: ClientKit, flow: Flow, *, signed: bool) -> dict[str, str]:
    """The ``/authorize`` query of a request pushed plain or as a request object."""
    params = flow.params()
    form = {"request": request_object(kit, params)} if signed else params
    response = await push(setup.server, kit, form)
    assert response.status_code == 201, response.text
    return {"client_id": kit.client_id, "request_uri": response.json()["request_uri"]}


def refused_unsigned(params: dict[str, str], flow: Flow, setup: Setup) -> None:
    assert (params["error"], params["state"], params["iss"]) == (
        "invalid_request",
        flow.state,
        setup.server.issuer,
    )
    assert params["error_description"] == "this client must send a signed request object"
    assert "code" not in params


async def require_signed(setup: Setup, kit: ClientKit, where: str, mp: pytest.MonkeyPatch) -> None:
    """Turn ``require_signed_request_object`` on for the client (its registration, RFC 7592) or
    the deployment (what a restart with the setting on gives the running service)."""
    if where == "client":
        await narrow_registration(setup, kit, require_signed_request_object=True)
        return
    objects = setup.server.services.authorization.service._objects
    flipped = objects._settings.model_copy(update={"require_signed_request_object": True})
    mp.setattr(objects, "_settings", flipped)


@pytest.mark.parametrize("where", ["client", "deployment"])
async def test_a_pushed_unsigned_request_is_refused_once_signed_objects_are_required(
    setup: Setup, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = await register_code_client(setup.server)
    flow = setup.flow(kit)
    query = await pushed(setup, kit, flow, signed=False)
    await require_signed(setup, kit, where, monkeypatch)
    refused_unsigned(redirected(await flow.http.get("/authorize", params=query)), flow, setup)


@pytest.mark.parametrize("where", ["client", "deployment"])
async def test_a_pushed_signed_request_goes_on_once_signed_objects_are_required(
    setup: Setup, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = await register_code_client(setup.server)
    flow = setup.flow(kit)
    query = await pushed(setup, kit, flow, signed=True)
    await require_signed(setup, kit, where, monkeypatch)
    page = await flow.http.get("/authorize", params=query)
    assert page.status_code == 200, page.text
    assert 'action="/authorize/login"' in page.text


@pytest.mark.parametrize("where", ["client", "deployment"])
async def test_an_unsigned_request_on_the_consent_page_gets_no_code_once_signed_are_required(
    setup: Setup, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check when the person approves: the request entered plain, before the change."""
    kit = await register_code_client(setup.server)
    flow = setup.flow(kit)
    page = await flow.login(await flow.start(), "alice")
    assert 'action="/authorize/consent"' in page.text, page.text
    await require_signed(setup, kit, where, monkeypatch)
    answer = await flow.decide(page)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"].startswith(REDIRECT_URI + "?")
    refused_unsigned(query_of(answer.headers["location"]), flow, setup)
