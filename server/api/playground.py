"""The playground: a one-page browser UI at `GET /` for trying the server without writing code.

Plain HTML, JS and CSS from `server/static/` — no build step and nothing fetched from elsewhere,
so the page works offline and behind firewalls, and the Content-Security-Policy below makes the
browser refuse any external load (a CDN script, font or image) should one ever creep in. The page
calls the public API like any other client (`POST /v1/stable-diffusion-3-medium-txt2img` with the
user's key), so it needs no route of its own beyond serving its files.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from server.api.renderers import SegmindRoute
from server.errors import NotFound

router = APIRouter(route_class=SegmindRoute)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The only files served, by name: nothing is looked up from the URL in the file system.
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # Generated images arrive as base64 and are shown as data: URLs.
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files ship with the package: revalidating them costs nothing and a new release shows at once.
    "Cache-Control": "no-cache",
}


@cache
def _file(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


@router.get("/", include_in_schema=False)
async def playground() -> Response:
    return Response(_file("playground.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound()
    return Response(_file(name), media_type=media_type, headers=HEADERS)
