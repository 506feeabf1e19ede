"""Refuse request bodies above a size limit with 413, before they are buffered.

A pure ASGI middleware: it checks `Content-Length` up front and counts the bytes of a chunked
body as they arrive, so a client cannot make the server hold an unbounded body in memory. The
img2img routes carry an image as base64 in their body, so their limit is that image's (server/config.py,
`limits.image_max_bytes`) on top of the usual one.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLarge


def image_body_bytes(*, max_body_bytes: int, image_max_bytes: int) -> int:
    """The body limit of a route that takes an image as base64: 4 characters per 3 bytes, plus the rest."""
    return max_body_bytes + -(-image_max_bytes // 3) * 4


def takes_an_image(path: str) -> bool:
    return path.rstrip("/").endswith("-img2img")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, image_max_bytes: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.image_route_bytes = image_body_bytes(max_body_bytes=max_bytes, image_max_bytes=image_max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.image_route_bytes if takes_an_image(scope.get("path", "")) else self.max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(send, limit)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the route's body read, so the app's own handlers answer it.
                    raise PayloadTooLarge(self.message(limit))
            return message

        await self.app(scope, counting_receive, send)

    @staticmethod
    def message(limit: int) -> str:
        return f"Request body too large: the limit is {limit} bytes"

    async def _refuse(self, send: Send, limit: int) -> None:
        body = json.dumps({"error": self.message(limit)}).encode()
        headers: list[Any] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
