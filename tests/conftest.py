"""Shared fixtures.

Databases: every store test runs on SQLite and PostgreSQL (``db_url`` is parametrised). PostgreSQL,
Redis: used when reachable on 127.0.0.1; when ``CI=true`` they are required (a missing service fails
the run instead of skipping); elsewhere the tests skip with the reason shown by ``-ra``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from trustplane.app import Services, create_app
from trustplane.keys.crypto import new_kek_text, public_jwk
from trustplane.schema import metadata
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

#: several xdist workers at once, and the ``serial`` marker (tests/parallel.py)
pytest_plugins = ["tests.parallel"]

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_URL = os.environ.get(
    "TRUSTPLANE_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TRUSTPLANE_TEST_REDIS", "redis://127.0.0.1:6379/15")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LEI = "5493001KJTIIGC8Y1R12"  # a valid ISO 17442 LEI (check digits 12)
EXECUTION = "https://execution.example/api"
CLEARING = "https://clearing.example/api"
KEK = new_kek_text()


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (CI=true) when a service is not reachable."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: services are required, not skipped)")
    pytest.skip(message)


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even when an event loop is already running."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; fail the test after
    ``timeout`` seconds naming ``what``. Tests wait for a condition this way, never for a fixed time:
    a fixed sleep is either too long (slow suite) or too short (flaky on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- databases


async def pg_admin(sql: str) -> None:
    """One statement on the PostgreSQL server's admin database, outside a transaction (CREATE/DROP
    DATABASE)."""
    engine = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text(sql))
    await engine.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A throw-away PostgreSQL database for this test session, migrated once."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"tp_test_{os.getpid()}_{secrets.token_hex(3)}"
    run_sync(pg_admin(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    async def migrate() -> None:
        db = Database(url)
        await upgrade(db)
        await db.dispose()

    run_sync(migrate())
    yield url
    run_sync(pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def truncate_all(url: str) -> None:
    db = Database(url)
    async with db.transaction() as conn:
        names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
        await conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))
    await db.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated, empty database: a fresh SQLite file, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'trustplane.db'}"
        db = Database(url)
        await upgrade(db)
        await db.dispose()
        yield url
    else:
        url = request.getfixturevalue("pg_database")
        await truncate_all(url)
        yield url


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'trustplane.db'}"
    db = Database(url)
    await upgrade(db)
    await db.dispose()
    return url


@pytest.fixture
async def pg_url(pg_database: str) -> str:
    await truncate_all(pg_database)
    return pg_database


# --------------------------------------------------------------------------- settings, services


def make_settings(db_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "issuer": "http://127.0.0.1:8000",
        "database_url": db_url,
        "data_dir": data_dir,
        "key_encryption_key": KEK,
        "key_rotation_interval": 0,
        "client_auth_methods": ("private_key_jwt", "client_secret_basic", "client_secret_post"),
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings_factory(db_url: str, tmp_path: Path) -> Callable[..., Settings]:
    return lambda **overrides: make_settings(db_url, tmp_path, **overrides)


@pytest.fixture
async def services(settings_factory: Callable[..., Settings]) -> AsyncIterator[Services]:
    svc = Services.build(settings_factory())
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def http(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    """The full app in process (lifespan included) behind an httpx client."""
    app = create_app(services.settings, services=_Started(services))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url=services.settings.issuer) as client,
    ):
        yield client


class _Started:
    """Wraps already-started services so the app's lifespan does not start/stop them twice."""

    def __init__(self, svc: Services) -> None:
        self._svc = svc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._svc, name)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


# --------------------------------------------------------------------------- clients


def sign_jwt(claims: dict[str, Any], key: Any, kid: str, overrides: dict[str, Any]) -> str:
    """Sign ``claims`` (ES256, header ``kid``) after applying test ``overrides``: a value of ``None``
    removes that claim, ``_headers``/``_key``/``_alg`` adjust the signing."""
    headers: dict[str, Any] = {"kid": kid}
    headers.update(overrides.pop("_headers", {}))
    alg = overrides.pop("_alg", "ES256")
    key = overrides.pop("_key", key)
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


@dataclass
class ClientKit:
    """A registered private_key_jwt client and its private key; assertions are built with PyJWT."""

    client_id: str
    key: ec.EllipticCurvePrivateKey
    issuer: str
    kid: str = "k1"
    pem: bytes = field(default=b"")

    def assertion(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.issuer,
            "iat": now,
            "exp": now + 60,
            "jti": uuid.uuid4().hex,
        }
        return sign_jwt(claims, self.key, self.kid, overrides)

    def auth(self, **overrides: Any) -> dict[str, str]:
        return {
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(**overrides),
        }


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwks_for(key: ec.EllipticCurvePrivateKey, kid: str = "k1") -> dict[str, Any]:
    return {"keys": [{**public_jwk(key), "kid": kid, "alg": "ES256", "use": "sig"}]}


async def register_kit(services: Services, **metadata: Any) -> ClientKit:
    key = new_ec_key()
    raw: dict[str, Any] = {
        "client_name": "test client",
        "lei": LEI,
        "scope": "order:create order:cancel settlement:submit",
        "allowed_resources": [EXECUTION, CLEARING],
        "introspection_resources": [EXECUTION],
        "jwks": jwks_for(key),
    }
    raw.update(metadata)
    reg = await services.clients.register(raw, initial_access_token=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ClientKit(reg.client.client_id, key, services.settings.issuer, pem=pem)


@pytest.fixture
async def kit(services: Services) -> ClientKit:
    return await register_kit(services)


# --------------------------------------------------------------------------- protocol suites


PROTOCOL_DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROTOCOL_DATABASES)
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    """One in-process server per test module and database (see ``tests/protocol_server.py``);
    modules using it run in a module-scoped event loop."""
    from tests.protocol_server import running_server

    async with running_server(request, tmp_path_factory) as started:
        yield started
