"""``/`` (the index) and ``/docs`` (Swagger UI from the package): nothing loads from another host."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest
from starlette.applications import Starlette

from trustplane.settings import Settings
from trustplane.site.http import SWAGGER_UI_VERSION, index_route

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


async def test_index_links_the_metadata_the_keys_and_the_docs(http: httpx.AsyncClient) -> None:
    response = await http.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    links = re.findall(r'href="([^"]+)"', response.text)
    assert links == ["/.well-known/oauth-authorization-server", "/jwks", "/docs"]
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


async def test_docs_load_swagger_ui_from_the_package(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources, page.text
    assert all(s.startswith("/static/swagger-ui/") for s in sources), sources
    assert "https://" not in page.text
    assert "http://" not in page.text
    assert '"validatorUrl": null' in page.text  # no badge fetched from the online validator
    assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text
    for source in sources:
        asset = await http.get(source)
        assert asset.status_code == 200, source
    js = await http.get(f"/static/swagger-ui/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}")
    assert js.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert len(js.content) > 1_000_000
    assert "/docs" not in (await http.get("/openapi.json")).json()["paths"]


@pytest.mark.parametrize(
    "path",
    ["/static/swagger-ui/nothing.js", "/static/swagger-ui/README.md.bak", "/static/"],
)
async def test_static_serves_nothing_else(http: httpx.AsyncClient, path: str) -> None:
    assert (await http.get(path)).status_code == 404
