"""Clients registered with a ``jwks_uri``: fetched from registration metadata only, through the
guarded outbound fetcher, cached, refetched on an unknown ``kid`` at most once per ``min_refetch``,
and anything unusable or refused yields no keys.

The JWKS servers here are on loopback, so the caches under test use the development policy
(``allow_insecure_loopback_jwks_uri``); the default policy must never reach them."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key
from trustplane.app import Services
from trustplane.clients.remote_jwks import (
    MAX_JWKS_BYTES,
    RemoteJwksCache,
    client_jwks_cache,
    partner_jwks_cache,
)
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.outbound import addresses as outbound_addresses


class JwksServer:
    """A loopback HTTP server whose answer the test sets; it counts the requests it gets."""

    def __init__(self) -> None:
        self.body: bytes = b'{"keys": []}'
        self.status = 200
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args: Any) -> None:
                return None

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def serve(self, jwks: dict[str, Any]) -> None:
        self.body = json.dumps(jwks).encode()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


def loopback_cache(ttl: float = 300.0, min_refetch: float = 60.0) -> RemoteJwksCache:
    fetcher = OutboundFetcher(OutboundPolicy.development(max_bytes=MAX_JWKS_BYTES))
    return RemoteJwksCache(fetcher, ttl=ttl, min_refetch=min_refetch)


@pytest.fixture
async def cache() -> Any:
    remote = loopback_cache()
    yield remote
    await remote.aclose()


async def test_keys_are_fetched_once_and_cached(
    jwks_server: JwksServer, cache: RemoteJwksCache
) -> None:
    jwks_server.serve(jwks_for(new_ec_key(), kid="a"))
    first = await cache.keys(jwks_server.url, "a")
    again = await cache.keys(jwks_server.url, "a")
    assert [k for k, _, _ in first] == ["a"]
    assert again == first
    assert jwks_server.hits == 1


async def test_unknown_kid_refetches_but_at_most_once_per_interval(jwks_server: JwksServer) -> None:
    remote = loopback_cache(min_refetch=0.0)
    jwks_server.serve(jwks_for(new_ec_key(), kid="a"))
    await remote.keys(jwks_server.url, "a")
    jwks_server.serve(jwks_for(new_ec_key(), kid="b"))
    assert [k for k, _, _ in await remote.keys(jwks_server.url, "b")] == ["b"]
    assert jwks_server.hits == 2
    await remote.aclose()

    limited = loopback_cache()
    await limited.keys(jwks_server.url, "b")
    for _ in range(20):  # a flood of bogus kids does not turn into a flood of fetches
        assert [k for k, _, _ in await limited.keys(jwks_server.url, "bogus")] == ["b"]
    assert jwks_server.hits == 3
    await limited.aclose()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(500, b'{"keys": []}', id="server-error"),
        pytest.param(200, b"not json", id="not-json"),
        pytest.param(200, b'{"keys": "nope"}', id="wrong-shape"),
        pytest.param(200, b"[" + b" " * MAX_JWKS_BYTES + b"]", id="oversized"),
    ],
)
async def test_unusable_answers_give_no_keys(
    jwks_server: JwksServer, cache: RemoteJwksCache, status: int, body: bytes
) -> None:
    jwks_server.status, jwks_server.body = status, body
    assert await cache.keys(jwks_server.url, "a") == []


FAILED_REFETCHES = [
    pytest.param(500, b'{"keys": []}', id="server-error"),
    pytest.param(503, b"", id="unavailable"),
    pytest.param(200, b"not json", id="not-json"),
    pytest.param(200, b'{"keys": "nope"}', id="wrong-shape"),
    pytest.param(200, b"[" + b" " * MAX_JWKS_BYTES + b"]", id="oversized"),
]


@pytest.mark.parametrize(("status", "body"), FAILED_REFETCHES)
async def test_a_failed_refetch_keeps_the_last_good_keys(
    jwks_server: JwksServer, status: int, body: bytes
) -> None:
    """An outage of the key server (or an answer that is not a JWK Set) must not refuse every
    assertion of the client until the next good fetch: the keys fetched last time stay usable,
    for a known kid after the ttl and for an unknown one alike, and the failed URI is tried
    again only after ``min_refetch``."""
    remote = loopback_cache(ttl=0.0, min_refetch=0.0)
    jwks_server.serve(jwks_for(new_ec_key(), kid="a"))
    good = await remote.keys(jwks_server.url, "a")
    jwks_server.status, jwks_server.body = status, body

    assert await remote.keys(jwks_server.url, "a") == good  # ttl over: refetched, failed
    assert await remote.keys(jwks_server.url, "rotated") == good
    assert jwks_server.hits == 3
    await remote.aclose()


async def test_an_unreachable_key_server_keeps_the_last_good_keys(jwks_server: JwksServer) -> None:
    remote = loopback_cache(ttl=0.0, min_refetch=0.0)
    jwks_server.serve(jwks_for(new_ec_key(), kid="a"))
    good = await remote.keys(jwks_server.url, "a")
    jwks_server.close()  # connection refused from now on

    assert await remote.keys(jwks_server.url, "a") == good
    await remote.aclose()


async def test_a_failed_fetch_is_retried_after_min_refetch_only(jwks_server: JwksServer) -> None:
    remote = loopback_cache(ttl=0.0)
    jwks_server.serve(jwks_for(new_ec_key(), kid="a"))
    jwks_server.status = 500
    for _ in range(5):
        assert await remote.keys(jwks_server.url, "a") == []
    assert jwks_server.hits == 1
    await remote.aclose()


async def test_a_good_refetch_drops_the_keys_it_no_longer_lists(jwks_server: JwksServer) -> None:
    remote = loopback_cache(ttl=0.0, min_refetch=0.0)
    old, new = new_ec_key(), new_ec_key()
    both = {"keys": [jwks_for(old, kid="old")["keys"][0], jwks_for(new, kid="new")["keys"][0]]}
    jwks_server.serve(both)
    assert [k for k, _, _ in await remote.keys(jwks_server.url, "old")] == ["old", "new"]
    jwks_server.serve(jwks_for(new, kid="new"))

    assert [k for k, _, _ in await remote.keys(jwks_server.url, "old")] == ["new"]
    await remote.aclose()


async def test_a_refetch_with_private_members_drops_every_key(jwks_server: JwksServer) -> None:
    """The owner published private key material: its signatures prove nothing any more."""
    remote = loopback_cache(ttl=0.0, min_refetch=0.0)
    jwks_server.serve(jwks_for(new_ec_key(), kid="a"))
    assert len(await remote.keys(jwks_server.url, "a")) == 1
    exposed = jwks_for(new_ec_key(), kid="a")
    exposed["keys"][0]["d"] = "c2VjcmV0"
    jwks_server.serve(exposed)

    assert await remote.keys(jwks_server.url, "a") == []
    await remote.aclose()


async def test_private_members_in_a_remote_jwks_give_no_keys(
    jwks_server: JwksServer, cache: RemoteJwksCache
) -> None:
    jwks = jwks_for(new_ec_key(), kid="a")
    jwks["keys"][0]["d"] = "c2VjcmV0"
    jwks_server.serve(jwks)
    assert await cache.keys(jwks_server.url, "a") == []


async def test_the_default_policy_never_reaches_a_loopback_jwks_uri(
    jwks_server: JwksServer, settings_factory: Callable[..., Any]
) -> None:
    jwks_server.serve(jwks_for(new_ec_key(), kid="a"))
    for remote in (RemoteJwksCache(), client_jwks_cache(settings_factory())):
        assert await remote.keys(jwks_server.url, "a") == []
        https_url = jwks_server.url.replace("http:", "https:")
        assert await remote.keys(https_url, "a") == []
        await remote.aclose()
    assert jwks_server.hits == 0


async def test_a_name_that_resolves_to_a_private_address_gives_no_keys(
    jwks_server: JwksServer, monkeypatch: pytest.MonkeyPatch, settings_factory: Callable[..., Any]
) -> None:
    """Registration accepted the name; at fetch time it resolves to 10.0.0.1 (or to the loopback
    JWKS server, which would answer): both are refused on the resolved address."""
    jwks_server.serve(jwks_for(new_ec_key(), kid="a"))
    port = jwks_server.url.split(":")[2].split("/")[0]
    for address in ("10.0.0.1", "127.0.0.1"):

        async def resolve(host: str, _port: int, address: str = address) -> list[str]:
            return [address]

        monkeypatch.setattr(outbound_addresses, "system_resolver", resolve)
        remote = client_jwks_cache(settings_factory())
        assert await remote.keys(f"https://keys.client.example:{port}/jwks.json", "a") == []
        await remote.aclose()
    assert jwks_server.hits == 0


@pytest.fixture
def loopback_services_settings(settings_factory: Callable[..., Any]) -> Any:
    return settings_factory(allow_insecure_loopback_jwks_uri=True)


async def test_a_jwks_uri_client_gets_a_token_and_its_key_rotation_is_followed(
    jwks_server: JwksServer, loopback_services_settings: Any
) -> None:
    services = Services.build(loopback_services_settings)
    await services.start()
    try:
        old_key, new_key = new_ec_key(), new_ec_key()
        jwks_server.serve(jwks_for(old_key, kid="old"))
        reg = await services.clients.register(
            {
                "lei": LEI,
                "scope": "order:create",
                "allowed_resources": [EXECUTION],
                "jwks_uri": jwks_server.url,
            },
            initial_access_token=None,
        )
        old = ClientKit(reg.client.client_id, old_key, services.settings.issuer, kid="old")
        new = ClientKit(reg.client.client_id, new_key, services.settings.issuer, kid="new")
        form = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}

        first = await services.token_endpoint.handle(_form({**form, **old.auth()}), None)
        assert first["scope"] == "order:create"

        jwks_server.serve(jwks_for(new_key, kid="new"))  # the client rotates its key
        services.remote_jwks._min_refetch = 0.0  # let the unknown kid trigger a refetch now
        second = await services.token_endpoint.handle(_form({**form, **new.auth()}), None)
        assert second["scope"] == "order:create"
        assert jwks_server.hits == 2
    finally:
        await services.stop()


def _form(data: dict[str, str]) -> Any:
    from trustplane.protocol.form import Form

    return Form.parse(
        httpx.QueryParams(data).__str__().encode(), "application/x-www-form-urlencoded"
    )


async def test_kept_keys_expire_after_max_stale(jwks_server: JwksServer) -> None:
    """The last good keys outlive a failed refetch for ``max_stale`` seconds after their fetch, not
    for ever: a key its owner withdrew behind a key server that stays down stops verifying. A good
    fetch afterwards gives keys again."""
    remote = RemoteJwksCache(
        OutboundFetcher(OutboundPolicy.development(max_bytes=MAX_JWKS_BYTES)),
        ttl=0.0,
        min_refetch=0.0,
        max_stale=0.3,
    )
    jwks_server.serve(jwks_for(new_ec_key(), kid="a"))
    good = await remote.keys(jwks_server.url, "a")
    jwks_server.status = 503

    assert await remote.keys(jwks_server.url, "a") == good  # within max_stale: kept
    await asyncio.sleep(0.35)
    assert await remote.keys(jwks_server.url, "a") == []  # past it: none
    assert await remote.keys(jwks_server.url, "a") == []  # and not brought back by a retry
    jwks_server.status = 200
    assert await remote.keys(jwks_server.url, "a") == good
    await remote.aclose()


def test_the_caches_take_max_stale_from_the_settings(settings_factory: Any) -> None:
    settings = settings_factory(jwks_max_stale=120.0)
    assert client_jwks_cache(settings)._max_stale == 120.0
    assert partner_jwks_cache(settings)._max_stale == 120.0
    assert settings_factory().jwks_max_stale == 86400.0
