"""An in-process server with the console on, and people of each role signed in through the real
authorization code flow (``/console/login`` -> ``/authorize`` login and consent -> callback)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest_asyncio

from tests.authorize.flow import PASSWORD, hidden_fields
from tests.conftest import LEI, PROTOCOL_DATABASES
from tests.protocol_server import Server, running_server

USER_LEI = "529900T8BM49AURSDO55"
#: username -> roles configured for them (``nobody`` has none)
PEOPLE = {
    "olivia": ("operator",),
    "carl": ("compliance",),
    "ada": ("auditor",),
    "dora": ("operator", "auditor"),
    "nobody": (),
}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Console:
    server: Server
    agents: dict[str, httpx.AsyncClient] = field(default_factory=dict)

    @property
    def services(self):  # type: ignore[no-untyped-def]
        return self.server.services

    def agent(self) -> httpx.AsyncClient:
        transport = self.server.http._transport
        return httpx.AsyncClient(transport=transport, base_url=self.server.issuer)

    async def csrf(self, agent: httpx.AsyncClient, path: str = "/console") -> str:
        page = await agent.get(path)
        assert page.status_code == 200, page.text
        found = CSRF.search(page.text)
        assert found, page.text
        return found.group(1)


async def sign_in(agent: httpx.AsyncClient, username: str, approve: bool = True) -> httpx.Response:
    """The whole flow as a browser does it; returns the callback's answer."""
    start = await agent.get("/console/login")
    assert start.status_code == 303, start.text
    page = await agent.get(start.headers["location"])
    assert page.status_code == 200, page.text
    if 'action="/authorize/login"' in page.text:
        data = {**hidden_fields(page.text), "username": username, "password": PASSWORD}
        posted = await agent.post("/authorize/login", data=data)
        assert posted.status_code == 303, posted.text
        page = await agent.get(posted.headers["location"])
    assert 'action="/authorize/consent"' in page.text, page.text
    decision = "approve" if approve else "deny"
    answer = await agent.post(
        "/authorize/consent", data={**hidden_fields(page.text), "decision": decision}
    )
    assert answer.status_code == 303, answer.text
    callback = answer.headers["location"]
    assert callback.startswith(agent.base_url.join("/console/callback").__str__()), callback
    return await agent.get(callback)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROTOCOL_DATABASES)
async def console(request, tmp_path_factory) -> AsyncIterator[Console]:  # type: ignore[no-untyped-def]
    async with running_server(
        request,
        tmp_path_factory,
        console_lei=LEI,
        console_roles={name: roles for name, roles in PEOPLE.items() if roles},
        operator_name="Northbridge Clearing Services Ltd",
    ) as server:
        users = server.services.authorization.users
        for name in PEOPLE:
            await users.add(name, name.title(), USER_LEI, PASSWORD)
        found = Console(server)
        for name in ("olivia", "carl", "ada"):
            agent = found.agent()
            answer = await sign_in(agent, name)
            assert answer.status_code == 303, answer.text
            found.agents[name] = agent
        try:
            yield found
        finally:
            for agent in found.agents.values():
                await agent.aclose()
