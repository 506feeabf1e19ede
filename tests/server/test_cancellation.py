"""`cancel_on_disconnect`: a route is cancelled when the ASGI server says the client left, not by polling.

The end-to-end guarantees (a client that leaves is refunded, under load and with a locked database)
are in test_admission_and_refunds.py and test_reliability.py; these pin the decorator's own rules
with a receive channel the test controls.
"""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request
from starlette.types import Message

from server.api.cancellation import cancel_on_disconnect
from server.errors import ClientDisconnected


class Channel:
    """An ASGI receive channel: the test says when the client leaves; counts how often it is read."""

    def __init__(self) -> None:
        self.reads = 0
        self.left = asyncio.Event()

    async def receive(self) -> Message:
        self.reads += 1
        await self.left.wait()
        return {"type": "http.disconnect"}


def request_on(channel: Channel) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, channel.receive)


def test_a_client_that_leaves_cancels_the_route_and_answers_499() -> None:
    cancelled = asyncio.Event()

    @cancel_on_disconnect
    async def route(request: Request) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async def scenario() -> None:
        channel = Channel()
        call = asyncio.ensure_future(route(request=request_on(channel)))
        await asyncio.sleep(0.05)
        channel.left.set()
        with pytest.raises(ClientDisconnected) as caught:
            await asyncio.wait_for(call, 5)
        assert caught.value.status_code == 499
        assert cancelled.is_set()

    asyncio.run(scenario())


def test_a_route_that_finishes_first_answers_and_reads_the_channel_once() -> None:
    @cancel_on_disconnect
    async def route(request: Request) -> str:
        await asyncio.sleep(1.0)  # four polls' time for a route that checked every 0.25 s
        return "images"

    async def scenario() -> None:
        channel = Channel()
        assert await route(request=request_on(channel)) == "images"
        # One read, waiting for the server's word: polling would have read it again and again.
        assert channel.reads == 1

    asyncio.run(scenario())


def test_a_route_that_fails_fails_as_it_would_undecorated() -> None:
    @cancel_on_disconnect
    async def route(request: Request) -> str:
        raise ValueError("broken")

    async def scenario() -> None:
        await route(request=request_on(Channel()))

    with pytest.raises(ValueError, match="broken"):
        asyncio.run(scenario())


def test_a_route_without_a_request_to_watch_is_refused_at_definition() -> None:
    async def route(prompt: str) -> str:
        return prompt

    with pytest.raises(TypeError, match="request"):
        cancel_on_disconnect(route)
