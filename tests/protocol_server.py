"""One in-process server per test module and database, for the table-driven HTTP protocol tests.

A negative table needs a running server, not a fresh one per case: every case brings its own assertion
``jti``, tokens and (where it changes one) its own client, and counts are compared before and after.
Building the app once per module and database keeps these suites within their time budget; the
function-scoped ``http`` fixture costs about half a second of set-up per case and per database.

A module uses it with ``pytestmark = pytest.mark.asyncio(loop_scope="module")`` and the ``server``
fixture from ``tests/conftest.py`` (one server per module and database); a module that needs other
settings defines its own ``server`` fixture calling :func:`running_server`.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest

from tests.conftest import (
    EXECUTION,
    LEI,
    ClientKit,
    _Started,
    make_settings,
    register_kit,
    truncate_all,
)
from trustplane.app import Services, create_app
from trustplane.clients.model import Client
from trustplane.clients.store import SqlClientStore
from trustplane.keys.crypto import public_jwk
from trustplane.protocol.tokens import issue_access_token
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@dataclass
class Server:
    """The started services, the app behind an httpx client (base_url = issuer), and one client."""

    services: Services
    http: httpx.AsyncClient
    kit: ClientKit

    @property
    def issuer(self) -> str:
        return self.services.settings.issuer

    async def token(self, kit: ClientKit | None = None, **form: Any) -> httpx.Response:
        """A client_credentials request authenticated by ``kit`` (default: the module's client)."""
        data = {
            "grant_type": "client_credentials",
            "scope": "order:create",
            "resource": EXECUTION,
            **(kit or self.kit).auth(),
        }
        data.update(form)
        return await self.http.post("/token", data={k: v for k, v in data.items() if v is not None})

    def expired_token(self) -> str:
        """A token we signed for the module's client that expired a minute ago."""
        return issue_access_token(
            self.services.keys.ring,
            issuer=self.issuer,
            subject=self.kit.client_id,
            client_id=self.kit.client_id,
            audience=EXECUTION,
            scopes=("order:create",),
            lifetime=-60,
            extra={"lei": LEI},
        ).token

    async def access_token(self, kit: ClientKit | None = None, **form: Any) -> str:
        response = await self.token(kit, **form)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


@contextlib.asynccontextmanager
async def running_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    database: str | None = None,
    **settings: Any,
) -> AsyncIterator[Server]:
    """Start a server on ``database`` (default: the fixture's param), "sqlite" or "postgresql"."""
    data_dir = tmp_path_factory.mktemp("server")
    if (database or request.param) == "sqlite":
        url = f"sqlite+aiosqlite:///{data_dir / 'trustplane.db'}"
        db = Database(url)
        await upgrade(db)
        await db.dispose()
    else:
        url = request.getfixturevalue("pg_database")
        await truncate_all(url)
    services = Services.build(make_settings(url, data_dir, **settings))
    await services.start()
    app = create_app(services.settings, services=_Started(services))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url=services.settings.issuer) as client,
        ):
            yield Server(services, client, await register_kit(services))
    finally:
        await services.stop()


def basic(client_id: str, secret: str) -> dict[str, str]:
    """RFC 6749 §2.3.1: each part form-urlencoded, then ``id:secret`` base64-encoded."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def register_secret_client(
    services: Services, method: str = "client_secret_basic", **metadata: Any
) -> tuple[str, str]:
    """A client registered for ``client_secret_basic``/``_post``; returns (client_id, secret)."""
    raw: dict[str, Any] = {
        "client_name": "secret client",
        "lei": LEI,
        "token_endpoint_auth_method": method,
        "scope": "order:create order:cancel",
        "allowed_resources": [EXECUTION],
    }
    raw.update(metadata)
    reg = await services.clients.register(raw, initial_access_token=None)
    assert reg.client_secret is not None
    return reg.client.client_id, reg.client_secret


async def register_kit_for(services: Services, key: Any, alg: str) -> ClientKit:
    """A private_key_jwt client whose registered key is ``key`` (EdDSA, PS256, ...)."""
    jwks = {"keys": [{**public_jwk(key), "kid": "k1", "alg": alg, "use": "sig"}]}
    kit = await register_kit(services, jwks=jwks)
    kit.key = key
    return kit


async def store_client(services: Services, client: Client) -> None:
    """Write a client straight through the store (for states the API cannot create), then reload."""
    async with services.db.transaction() as conn:
        if not await SqlClientStore().replace(conn, client):
            await SqlClientStore().add(conn, client)
    await services.clients.load()
