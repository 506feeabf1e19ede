"""Cancel a route's work when its client goes away, told by the server rather than found by polling.

Once a request's body is read, the next message the ASGI server delivers on its receive channel
is `http.disconnect`: the client closed the connection (or the response was sent, which cannot
happen while the route still runs). `cancel_on_disconnect` runs the route and that listener side
by side and cancels the route when the listener hears first. Cancelling reaches the queue (a
waiting job is dropped, a running one stops at its next step) and the serving layer refunds the
reservation, so a client that gives up is not charged.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from server.errors import ClientDisconnected

P = ParamSpec("P")
T = TypeVar("T")


async def disconnected(receive: Receive) -> None:
    """Return when the client has gone; the request's body must have been read already."""
    while (await receive())["type"] != "http.disconnect":
        pass


def cancel_on_disconnect(endpoint: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorate a route that takes `request: Request`: it is cancelled if the client leaves first,
    which answers `ClientDisconnected` (499: nobody reads it, the access log and metrics do).

    Its dependencies, the body among them, are resolved before it runs, so the listener never takes
    a message of the body.
    """
    if "request" not in inspect.signature(endpoint).parameters:
        raise TypeError(f"{endpoint.__qualname__} needs a `request: Request` parameter to watch")

    @functools.wraps(endpoint)
    async def watched(*args: P.args, **kwargs: P.kwargs) -> T:
        request = kwargs["request"]
        assert isinstance(request, Request)
        work = asyncio.ensure_future(endpoint(*args, **kwargs))
        gone = asyncio.ensure_future(disconnected(request.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # the client left, or this request itself is being cancelled
        try:
            return await work  # finished before the cancel landed: a normal (unread) answer
        except asyncio.CancelledError:
            if not gone.done() or gone.cancelled():
                raise  # cancelled from elsewhere: not the client's doing
            raise ClientDisconnected() from None

    return watched
