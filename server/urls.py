"""Absolute URLs that clients will GET back, built from the request they came with.

Behind a reverse proxy the scheme and host the client used are in X-Forwarded-Proto and
X-Forwarded-Host; a status URL built from the proxy's view (http://127.0.0.1:8000) would be
unreachable for the client.
"""

from __future__ import annotations

from starlette.requests import Request


def public_base_url(request: Request) -> str:
    headers = request.headers
    scheme = headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = headers.get("x-forwarded-host", headers.get("host", request.url.netloc)).split(",")[0].strip()
    prefix = headers.get("x-forwarded-prefix", "").rstrip("/")
    return f"{scheme}://{host}{prefix}"
