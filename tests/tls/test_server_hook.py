"""The ASGI TLS extension our uvicorn protocol adds, over real TLS handshakes on loopback: the
verified client certificate reaches the app; TLS below 1.2 and TLS 1.2 suites outside FAPI 2.0 are
refused; a certificate from a CA that is not ``tls_client_ca`` fails the handshake."""

from __future__ import annotations

import asyncio
import socket
import ssl
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from tests.conftest import make_settings
from tests.tls.pki import Pki, build_pki
from trustplane.server import BoundedHttpToolsProtocol
from trustplane.tls.context import server_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


async def echo_tls(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = orjson.dumps({"scheme": scope["scheme"], "tls": scope.get("extensions", {}).get("tls")})
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def tls_server(pki: Pki, tmp_path: Path) -> AsyncIterator[str]:
    settings = make_settings(
        "sqlite+aiosqlite:///:memory:",
        tmp_path,
        tls_certificate=pki.path("server.crt"),
        tls_key=pki.path("server.key"),
        tls_client_ca=pki.ca_file,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        echo_tls,
        http=BoundedHttpToolsProtocol,
        lifespan="off",
        log_level="warning",
        ssl_context_factory=lambda _c, _d: server_context(settings),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(1000):  # bounded: at most 10 s
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started
    yield f"https://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await asyncio.wait_for(task, 10)
    sock.close()


def client_context(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(*pki.pair(cert))
    return ctx


async def get(url: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    async with httpx.AsyncClient(verify=ctx) as http:
        response = await http.get(url)
    assert response.status_code == 200
    return orjson.loads(response.content)  # type: ignore[no-any-return]


async def test_client_certificate_reaches_the_app(pki: Pki, tls_server: str) -> None:
    body = await get(tls_server, client_context(pki, "client"))
    tls = body["tls"]

    assert body["scheme"] == "https"
    assert tls["client_cert_chain"] == [pki.client.cert_pem().decode()]
    assert tls["client_cert_name"] == "CN=desk-7,O=Acme Trading"
    assert tls["client_cert_error"] is None
    assert tls["server_cert"] is None
    assert tls["tls_version"] == 0x0304  # TLS 1.3 whenever the client offers it
    assert tls["cipher_suite"] in (0x1301, 0x1302, 0x1303)


async def test_without_client_certificate_the_handshake_succeeds(pki: Pki, tls_server: str) -> None:
    tls = (await get(tls_server, client_context(pki)))["tls"]
    assert tls["client_cert_chain"] == []
    assert tls["client_cert_name"] is None


async def test_keep_alive_requests_share_the_connection_extension(
    pki: Pki, tls_server: str
) -> None:
    async with httpx.AsyncClient(verify=client_context(pki, "client")) as http:
        first = (await http.get(tls_server)).json()["tls"]
        second = (await http.get(tls_server)).json()["tls"]
    assert first == second
    assert first["client_cert_chain"]


async def test_tls12_negotiates_a_fapi_suite(pki: Pki, tls_server: str) -> None:
    ctx = client_context(pki, "client")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    tls = (await get(tls_server, ctx))["tls"]
    assert tls["tls_version"] == 0x0303
    # TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
    assert tls["cipher_suite"] in (0xC02F, 0xC030)


@pytest.mark.parametrize(
    "cipher", ["ECDHE-RSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-SHA256", "AES128-GCM-SHA256"]
)
async def test_tls12_suites_outside_fapi_are_refused(
    pki: Pki, tls_server: str, cipher: str
) -> None:
    ctx = client_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher)
    with pytest.raises(httpx.ConnectError):
        await get(tls_server, ctx)


async def test_tls11_is_refused(pki: Pki, tls_server: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_file)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # the point is to offer a deprecated version
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(httpx.ConnectError):
        await get(tls_server, ctx)


@pytest.mark.parametrize("cert", ["stranger", "self_signed"])
async def test_certificate_from_another_ca_fails_the_handshake(
    pki: Pki, tls_server: str, cert: str
) -> None:
    """With TLS 1.3 the server's refusal arrives after the client's Finished: at the first read."""
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        await get(tls_server, client_context(pki, cert))
