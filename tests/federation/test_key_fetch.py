"""The partners' key sets are fetched only through the one guarded fetcher (BRIEF, trust
boundaries): the cache the federation component is wired with refuses a host outside
``TRUSTPLANE_FEDERATION_JWKS_HOSTS`` and an address that is not public before any request, and
counts each refusal under its own purpose; a refused fetch yields no key (the assertion is then
``invalid_grant`` ``signature``, tested over HTTP in ``test_jwt_bearer.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.conftest import make_settings
from trustplane.clients.remote_jwks import partner_jwks_cache

pytestmark = pytest.mark.asyncio


def refused(outcome: str) -> float:
    labels = {"purpose": "partner_jwks", "outcome": outcome}
    return REGISTRY.get_sample_value("trustplane_outbound_fetch_total", labels) or 0.0


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param("https://elsewhere.example/jwks", id="host-not-allow-listed"),
        pytest.param("https://10.0.0.7/jwks", id="private-address"),
        pytest.param("https://169.254.169.254/latest/meta-data", id="metadata-service"),
        pytest.param("http://keys.partner.example/jwks", id="plain-http"),
        pytest.param("https://user:pw@keys.partner.example/jwks", id="credentials"),
    ],
)
async def test_the_wired_key_cache_refuses_before_any_request(tmp_path: Path, uri: str) -> None:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}",
        tmp_path,
        federation_jwks_hosts=("keys.partner.example",),
    )
    cache = partner_jwks_cache(settings)
    before = refused("refused_url") + refused("refused_address")
    try:
        assert await cache.keys(uri, None) == []
    finally:
        await cache.aclose()
    assert refused("refused_url") + refused("refused_address") == before + 1
