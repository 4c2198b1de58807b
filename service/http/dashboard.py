"""The dashboard at `/` and the API docs at `/schema`, with every asset served by this process (no CDN).

- `GET /` is the dashboard's single page (`static/dashboard/index.html`); its scripts, styles and the vendored
  libraries are files under `/static/`, served by Litestar's static files router from this package's fixed
  `static/` folder (a path outside it is a 404). None of them holds data: the page calls `/v1` with the API key
  the user enters, so it sees exactly what the key's project may see.
- `/schema` and `/schema/swagger` are Swagger UI, `/schema/redoc` ReDoc, `/schema/openapi.json|yaml` the
  document: Litestar's render plugins, pointed at the copies in `static/vendor/` (versions and licences in
  `static/vendor/VENDORED.md`).
"""

from __future__ import annotations

from pathlib import Path

from litestar import Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.enums import MediaType
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    OpenAPIRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.static_files import create_static_files_router

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PATH = "/static"
VENDOR = f"{STATIC_PATH}/vendor"

# The page may load and call only this server: scripts and styles from /static, fetches to /v1. uPlot sizes its
# elements through inline styles, hence 'unsafe-inline' for styles only.
DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": DASHBOARD_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def render_plugins() -> list[OpenAPIRenderPlugin]:
    """Swagger UI at /schema and /schema/swagger, ReDoc at /schema/redoc, the document as JSON and YAML."""
    favicon = f"<link rel='icon' type='image/png' href='{VENDOR}/swagger-ui/favicon-32x32.png'>"
    return [
        SwaggerRenderPlugin(
            path=["/", "/swagger"],
            js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
            css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
            standalone_preset_js_url=f"{VENDOR}/swagger-ui/swagger-ui-standalone-preset.js",
            favicon=favicon,
        ),
        RedocRenderPlugin(
            path="/redoc", js_url=f"{VENDOR}/redoc/redoc.standalone.js", google_fonts=False, favicon=favicon
        ),
        JsonRenderPlugin(path="/openapi.json"),
        YamlRenderPlugin(path=["/openapi.yaml", "/openapi.yml"]),
    ]


def dashboard_routes() -> list[Router | HTTPRouteHandler]:
    """The page at `/` and the static files under /static (neither needs a key nor is in the API document)."""
    page = (STATIC_DIR / "dashboard" / "index.html").read_bytes()

    @get("/", include_in_schema=False, sync_to_thread=False, name="dashboard")
    def dashboard() -> Response[bytes]:
        return Response(page, media_type=MediaType.HTML, headers=PAGE_HEADERS)

    static = create_static_files_router(
        path=STATIC_PATH,
        directories=[STATIC_DIR],
        name="static",
        cache_control=CacheControlHeader(no_cache=True),  # revalidated (ETag): an upgrade is seen at once
        include_in_schema=False,
    )
    return [dashboard, static]
