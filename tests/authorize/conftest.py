"""An in-process server per module and database with an authorization-code client and a user."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest_asyncio

from tests.authorize.flow import PASSWORD, REDIRECT_URI, Flow
from tests.conftest import EXECUTION, ClientKit, register_kit
from tests.protocol_server import Server
from trustplane.users.model import User

USER_LEI = "529900T8BM49AURSDO55"  # a valid LEI of another legal entity


async def register_code_client(server: Server, **metadata: object) -> ClientKit:
    raw: dict[str, object] = {
        "client_name": "Arranger Order Service",
        "grant_types": ["authorization_code", "refresh_token"],
        "redirect_uris": [REDIRECT_URI, "http://127.0.0.1:4711/callback"],
        "scope": "order:create order:cancel",
        "allowed_resources": [EXECUTION],
        "authorization_details_types": ["trade_instruction"],
    }
    raw.update(metadata)
    return await register_kit(server.services, **raw)


@dataclass
class Setup:
    server: Server
    kit: ClientKit
    user: User

    def flow(self, kit: ClientKit | None = None) -> Flow:
        """A fresh user agent (own cookies) on the in-process app."""
        transport = self.server.http._transport
        agent = httpx.AsyncClient(transport=transport, base_url=self.server.issuer)
        return Flow(agent, (kit or self.kit).client_id, EXECUTION)

    async def token(self, form: dict[str, str], kit: ClientKit | None = None) -> httpx.Response:
        return await self.server.http.post("/token", data={**form, **(kit or self.kit).auth()})

    async def add_user(self, name: str) -> User:
        return await self.server.services.authorization.users.add(
            name, name.title(), USER_LEI, PASSWORD
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(server: Server) -> AsyncIterator[Setup]:
    kit = await register_code_client(server)
    user = await server.services.authorization.users.add(
        "alice", "Alice Trader", USER_LEI, PASSWORD
    )
    yield Setup(server, kit, user)
