"""``/`` (the index) and ``/docs`` (Swagger UI from the package): nothing loads from another host."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from starlette.applications import Starlette

from trustplane.app import create_ops_app
from trustplane.settings import Settings
from trustplane.site.http import SWAGGER_UI_VERSION, index_route

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
async def ops(http: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    """The operations listener's app (``create_ops_app``), where the docs are served."""
    public = http._transport.app  # type: ignore[attr-defined]
    app = create_ops_app(public.state.services, public.openapi)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9464"
    ) as client:
        yield client


async def test_index_links_the_metadata_and_the_keys(http: httpx.AsyncClient) -> None:
    response = await http.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    links = re.findall(r'href="([^"]+)"', response.text)
    # the docs are on the operations listener, which the public index does not point at
    assert links == ["/.well-known/oauth-authorization-server", "/jwks"]
    for link in links:
        assert (await http.get(link)).status_code == 200
    assert "<script" not in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src" not in policy  # no script may run
    assert response.headers["x-frame-options"] == "DENY"


async def test_index_names_the_operator(
    http: httpx.AsyncClient, settings_factory: Callable[..., Settings]
) -> None:
    issuer_host = httpx.URL(str(http.base_url)).host
    assert (
        f'<header><p id="operator">{issuer_host}<small>' in (await http.get("/")).text
    )  # the default
    settings = settings_factory(operator_name="Northbridge Clearing & Co")
    app = Starlette(routes=[index_route(settings, docs_url=None)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=settings.issuer
    ) as client:
        page = (await client.get("/")).text
    assert '<header><p id="operator">Northbridge Clearing &amp; Co<small>' in page
    assert 'href="/docs"' not in page  # docs on another listener: no link here


async def test_docs_load_swagger_ui_from_the_package(
    http: httpx.AsyncClient, ops: httpx.AsyncClient
) -> None:
    assert (await http.get("/docs")).status_code == 404  # not on the public listener
    page = await ops.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources, page.text
    assert all(s.startswith("/static/swagger-ui/") for s in sources), sources
    assert "https://" not in page.text
    assert "http://" not in page.text
    assert '"validatorUrl": null' in page.text  # no badge fetched from the online validator
    assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text
    for source in sources:
        asset = await ops.get(source)
        assert asset.status_code == 200, source
    js = await ops.get(f"/static/swagger-ui/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}")
    assert js.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert len(js.content) > 1_000_000
    assert "/docs" not in (await ops.get("/openapi.json")).json()["paths"]


@pytest.mark.parametrize(
    "path",
    ["/static/swagger-ui/nothing.js", "/static/swagger-ui/README.md.bak", "/static/"],
)
async def test_static_serves_nothing_else(
    http: httpx.AsyncClient, ops: httpx.AsyncClient, path: str
) -> None:
    assert (await ops.get(path)).status_code == 404
    assert (await http.get(path)).status_code == 404
