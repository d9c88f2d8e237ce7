"""The browser pages: the recorder at ``/record`` and the session view at ``/sessions/<id>``.

Both are static files shipped inside the package (``scribe_server/web/static``);
they talk to the server only through the public protocol (Socket.IO with the
token as ``auth``) and the HTTP session API (``Authorization`` header), so this
module adds no server logic.  The vendored ``socket.io.min.js`` is produced by
the build step in ``web/`` (see docs/browser.md), never edited by hand.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

import scribe_protocol as proto

STATIC = Path(__file__).resolve().parent / "web" / "static"

#: Pages load scripts, styles and workers from this origin only; the socket goes
#: to the same origin; the audio player plays a blob fetched with the token.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self' blob:; connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _page(name: str):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / name, headers=SECURITY_HEADERS)

    return handler


async def _session_page(request: web.Request) -> web.StreamResponse:
    if not proto.SESSION_ID_RE.fullmatch(request.match_info["session_id"]):
        raise web.HTTPNotFound(text="no such session id")
    return web.FileResponse(STATIC / "session.html", headers=SECURITY_HEADERS)


@web.middleware
async def _static_headers(request: web.Request, handler):
    response = await handler(request)
    if request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-cache")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def add_routes(app: web.Application) -> None:
    """Serve the recorder, the session view and their static files on ``app``."""
    app.middlewares.append(_static_headers)
    app.router.add_get("/record", _page("record.html"))
    app.router.add_get("/sessions/{session_id}", _session_page)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
