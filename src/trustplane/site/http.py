"""``/`` (a small server-rendered index, no script) and ``/docs`` (Swagger UI from the package).

Both are functions a listener mounts: :func:`index_route` on the public one, :func:`docs_routes` on
the operations listener, which serves the OpenAPI document.
"""

from __future__ import annotations

from importlib import resources
from urllib.parse import urlsplit

from fastapi.openapi.docs import get_swagger_ui_html
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from trustplane import __version__
from trustplane.settings import Settings

#: The vendored ``swagger-ui-dist`` (``static/swagger-ui/README.md`` says where it came from).
SWAGGER_UI_VERSION = "5.35.0"
STATIC_PATH = "/static"
INDEX_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def index_route(settings: Settings, *, docs_url: str | None) -> Route:
    """``GET /``: who runs this service and links to the metadata, the JWKS and (when this listener
    serves them) the API docs."""
    templates = Environment(
        loader=PackageLoader("trustplane.site", "templates"),
        autoescape=select_autoescape(default=True),
    )
    body = templates.get_template("index.html").render(
        operator=settings.operator_name or urlsplit(settings.issuer).hostname or "trustplane",
        issuer=settings.issuer,
        version=__version__,
        docs_url=docs_url,
    )

    async def index(_request: Request) -> Response:
        return HTMLResponse(body, headers=INDEX_HEADERS)

    return Route("/", index, methods=["GET"])


def docs_routes(
    title: str, *, openapi_url: str = "/openapi.json", docs_url: str = "/docs"
) -> list[BaseRoute]:
    """Swagger UI at ``docs_url`` from the vendored assets under ``/static/swagger-ui``: nothing is
    loaded from a CDN, and the online validator badge is off, so it works offline. The operations
    listener (``app.create_ops_app``) mounts these beside the OpenAPI document."""
    assets = f"{STATIC_PATH}/swagger-ui"

    async def docs(_request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - API",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}",
            swagger_css_url=f"{assets}/swagger-ui.css?v={SWAGGER_UI_VERSION}",
            swagger_favicon_url=f"{assets}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},
        )

    static = StaticFiles(directory=str(resources.files("trustplane.site") / "static"))
    return [
        Route(docs_url, docs, methods=["GET"], include_in_schema=False),
        Mount(STATIC_PATH, app=static, name="static"),
    ]
