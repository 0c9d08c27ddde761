"""`/ui`: the live dashboard, a static page served from files shipped in the package
(`gswarm/head/ui/`): no CDN, nothing fetched from elsewhere, so it works offline.

The page and its assets hold no data and need no token; the page signs in with the api token
(kept in the browser's session storage) and sends it with every REST call and as `?token=` on
`/ws/events`. The files are read once, when the routes are set up, and served from memory by
name: a request can only ever get one of them."""

from __future__ import annotations

import re
from importlib import resources

from aiohttp import web

UI_PREFIX = "/ui"
"""Where the dashboard is served; it and everything below it need no token."""

_CONTENT_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}

_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' {ws}://{host}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page runs only its own script and talks only to its own head."""

_HOST = re.compile(r"[A-Za-z0-9.:\[\]-]{1,300}")
"""A Host header fit to be named in the policy (its socket's address)."""


def _load_assets() -> dict[str, tuple[bytes, str]]:
    assets: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("gswarm.head").joinpath("ui").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _CONTENT_TYPES:
            assets[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    return assets


def is_public(path: str) -> bool:
    """True for the dashboard's page and assets, which need no token."""
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


def setup(app: web.Application) -> None:
    """Attach `GET /ui` (the page) and `GET /ui/{name}` (its scripts and styles)."""
    assets = _load_assets()

    def answer(request: web.Request, name: str) -> web.Response:
        found = assets.get(name)
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        ws = "wss" if request.secure else "ws"
        host = request.host if _HOST.fullmatch(request.host) else "localhost"
        headers = {
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": _POLICY.format(ws=ws, host=host),
        }
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)

    async def page(request: web.Request) -> web.Response:
        return answer(request, "index.html")

    async def asset(request: web.Request) -> web.Response:
        return answer(request, request.match_info["name"])

    app.router.add_get(UI_PREFIX, page)
    app.router.add_get(UI_PREFIX + "/", page)
    app.router.add_get(UI_PREFIX + "/{name}", asset)
