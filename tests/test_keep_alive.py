"""Idle keep-alive connections: the client side always closes first (docs/operations.md
"Listeners"). A request written on a connection the server is closing is lost with a reset (httpx:
an empty ``ReadError``; a PEP asking its PDP fails closed, a spurious deny), so trustplane's
servers keep idle connections longer than its outbound clients and than a load balancer in front."""

from __future__ import annotations

import os

import pytest

from trustplane.outbound.addresses import system_resolver
from trustplane.outbound.connection import KEEPALIVE_EXPIRY, GuardedBackend, GuardedTransport
from trustplane.server import uvicorn_config
from trustplane.settings import SettingsError, load_settings

#: uvicorn's and Node.js's default keep-alive: the servers trustplane's clients may call.
COMMON_SERVER_KEEP_ALIVE = 5.0


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TRUSTPLANE_"):
            monkeypatch.delenv(name)


def test_the_server_keeps_idle_connections_75_s_by_default() -> None:
    config = uvicorn_config(load_settings())
    assert config.timeout_keep_alive == 75


def test_the_keep_alive_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTPLANE_KEEP_ALIVE", "120")
    assert uvicorn_config(load_settings()).timeout_keep_alive == 120


@pytest.mark.parametrize("value", ["0", "3601", "soon"])
def test_a_wrong_keep_alive_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TRUSTPLANE_KEEP_ALIVE", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid setting TRUSTPLANE_KEEP_ALIVE: ")


async def test_outbound_connections_expire_before_any_common_server_closes_them() -> None:
    transport = GuardedTransport(GuardedBackend(system_resolver))
    try:
        expiry = transport._pool._keepalive_expiry
        assert expiry == KEEPALIVE_EXPIRY
        assert expiry is not None
        assert expiry < COMMON_SERVER_KEEP_ALIVE
        assert expiry < load_settings().keep_alive
    finally:
        await transport.aclose()
