"""The server's edge: uvicorn's configuration, and the connection limits uvicorn lacks.

uvicorn (0.54, httptools or h11) closes an idle kept-alive connection, but nothing else: a
connection that never finishes its request head, or its body, stays open for ever, and its
`limit_concurrency` only answers 503 to requests whose head is complete, so partial-header
connections (slowloris) are counted against no limit at all and can use up the process's file
descriptors. `guarded_protocol` wraps uvicorn's own HTTP protocol class with:

- a cap on open connections, all clients together and per client address: one more is closed as
  soon as it is accepted, so it holds a file descriptor for microseconds, not for ever;
- a header timeout: the request head must arrive within `header_timeout_s` of the connection
  opening, or of the previous response on a kept-alive connection;
- a body timeout: the body must arrive within `body_timeout_s` of its head;
- a bound on the head's size (httptools has none; h11 gets the same bound as its own setting);
- a JSON body on the 400 that uvicorn writes itself for a request it cannot parse.

`uvicorn_config` is the one place a uvicorn `Config` is built from `Settings`: `serve` and the
tests' live servers both use it, so the tests exercise the real set-up. docs/reliability.md,
"Connections and start-up", has the decisions and defaults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import Counter
from typing import Any, ClassVar, cast

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from server.config import ConnectionSettings, Settings

logger = logging.getLogger("sd3.connections")


# A plain answer written by the protocol itself (no request reached the app): `connection: close`
# and nothing else to parse.
def _plain_answer(status: bytes, message: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"error": message}).encode()
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n" % status
    return head + extra + b"content-length: %d\r\n\r\n" % len(body) + body


_HEADERS_TOO_LARGE = _plain_answer(
    b"431 Request Header Fields Too Large", "Request line and headers too large"
)
# Written to a connection over the cap as soon as it is accepted, before its request is read, and the
# connection closed at once. A client whose request had already arrived may see a reset instead of
# the answer (unread data turns a close into a reset): either way it was refused, and lingering to
# read its request would let a flood of new connections hold descriptors again.
_TOO_MANY_CONNECTIONS = _plain_answer(
    b"503 Service Unavailable", "Too many open connections; retry later", b"retry-after: 5\r\n"
)
# Descriptors the process needs besides its connections: the ledger's pooled SQLite connections
# (each with its -wal and -shm), model files, logging, the event loop.
RESERVED_DESCRIPTORS = 128

# During an attack every refused connection would log a line: one warning per this many seconds.
_REFUSAL_LOG_INTERVAL_S = 10.0


class ConnectionGuard(asyncio.Protocol):
    """Mixed in before uvicorn's HTTP protocol class (see `guarded_protocol`).

    It uses only what uvicorn's httptools and h11 protocols share: `transport`, `cycle` (the
    request being answered, created when a head is complete), the cycle's `more_body` and
    `response_complete`, and the `connection_made`, `data_received`, `connection_lost` and
    `on_response_complete` methods.
    """

    limits: ClassVar[ConnectionSettings]
    # Per server (each `guarded_protocol` call makes a new class): open connections per client.
    open_per_client: ClassVar[Counter[str]]
    open_total: ClassVar[int]
    last_refusal_log: ClassVar[float]

    transport: asyncio.Transport
    cycle: Any

    _client_key: str | None = None
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    # The cycle that was current when the connection started waiting for a head: a different one
    # means the head has arrived.
    _waiting_after: Any = None
    _waiting_for_head: bool = False
    _head_bytes: int = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cls = type(self)
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        limits = cls.limits
        per_client = limits.max_connections_per_client
        full = cls.open_total >= limits.max_connections
        if full or (per_client and cls.open_per_client[client] >= per_client):
            cls._log_refusal(client)
            # Not handed to uvicorn: this connection never reaches the app and frees its descriptor now.
            cast(asyncio.Transport, transport).write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._client_key = client
        cls.open_total += 1
        cls.open_per_client[client] += 1
        super().connection_made(transport)
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client_key is None:  # refused in connection_made: uvicorn never saw it
            return
        cls = type(self)
        cls.open_total -= 1
        cls.open_per_client[self._client_key] -= 1
        if cls.open_per_client[self._client_key] <= 0:
            del cls.open_per_client[self._client_key]
        self._client_key = None
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting = self._waiting_for_head
        super().data_received(data)
        if self.transport.is_closing():
            return
        if not waiting:
            if self._body_timer is not None and not self.cycle.more_body:
                self._cancel_timers()  # the body is complete
            return
        if self.cycle is not self._waiting_after:
            self._head_arrived()
            return
        previous = self._waiting_after
        if previous is not None and previous.more_body:
            # The rest of a body the app answered without reading (an early 413): the parser drops
            # it, so it costs no memory, and it is not a head. The header timer still bounds it.
            return
        self._head_bytes += len(data)
        if self._head_bytes > type(self).limits.max_header_bytes:
            self._cancel_timers()
            self.transport.write(_HEADERS_TOO_LARGE)
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # A kept-alive connection waits for its next head under the same timeout as a new one,
        # unless a pipelined request's head has already arrived.
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self._wait_for_head()
        else:  # h11 parses a buffered pipelined head only now
            self._head_arrived()

    def send_400_response(self, msg: str) -> None:
        # Both uvicorn protocols answer a request they cannot parse (a bad Content-Length, a body
        # past it, a request line that is not HTTP) with a plain-text 400: ours is JSON, as every
        # other error of this server.
        self._cancel_timers()
        self.transport.write(_plain_answer(b"400 Bad Request", msg))
        self.transport.close()

    # --- timers -----------------------------------------------------------------------------------

    def _wait_for_head(self) -> None:
        self._cancel_timers()
        self._waiting_for_head = True
        self._waiting_after = self.cycle
        self._head_bytes = 0
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(type(self).limits.header_timeout_s, self._head_timed_out)

    def _head_arrived(self) -> None:
        self._cancel_timers()
        self._waiting_for_head = False
        cycle = self.cycle
        if cycle.more_body:
            loop = asyncio.get_running_loop()
            self._body_timer = loop.call_later(type(self).limits.body_timeout_s, self._body_timed_out, cycle)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head and self.cycle is self._waiting_after and not self.transport.is_closing():
            self.transport.close()

    def _body_timed_out(self, cycle: Any) -> None:
        self._body_timer = None
        # Closing tells the app the client is gone (`http.disconnect`), as a real disconnect would.
        if cycle.more_body and not cycle.response_complete and not self.transport.is_closing():
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    @classmethod
    def _log_refusal(cls, client: str) -> None:
        now = time.monotonic()
        if now - cls.last_refusal_log >= _REFUSAL_LOG_INTERVAL_S:
            cls.last_refusal_log = now
            logger.warning(
                "connection refused: %d open (cap %d), %d from %s (cap %d)",
                cls.open_total,
                cls.limits.max_connections,
                cls.open_per_client[client],
                client or "a local socket",
                cls.limits.max_connections_per_client,
            )


def guarded_protocol(limits: ConnectionSettings) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with `limits` enforced.

    A new class per call, so that two servers in one process (as in the tests) count apart.
    """
    return type(
        f"Guarded{AutoHTTPProtocol.__name__}",
        (ConnectionGuard, AutoHTTPProtocol),
        {"limits": limits, "open_per_client": Counter(), "open_total": 0, "last_refusal_log": -1e9},
    )


class TooFewDescriptors(Exception):
    """The open-file limit is below what `max_connections` needs; the message is one sentence."""


def ensure_descriptors(limits: ConnectionSettings) -> None:
    """Raise the soft open-file limit so that `max_connections` fits under it, or say it cannot.

    The cap is only a defence if it is reached before the descriptors run out: otherwise accepting
    fails for everyone (and the database cannot open its files) while the cap still has room.
    """
    if sys.platform == "win32":  # no RLIMIT_NOFILE; sockets are not bounded by it
        return
    import resource

    needed = limits.max_connections + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return
    raise TooFewDescriptors(
        f"--max-connections {limits.max_connections} needs {needed} open files but this process may "
        f"open {hard} (ulimit -n): lower --max-connections (SD3_CONNECTIONS__MAX_CONNECTIONS) below "
        f"{max(hard - RESERVED_DESCRIPTORS, 1)} or raise the limit."
    )


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration of `serve`, from the settings alone."""
    limits = settings.connections
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(limits),
        # No route is a WebSocket; an upgraded connection would also leave the timers above.
        ws="none",
        timeout_keep_alive=limits.keep_alive_s,
        # A backstop only: the guard's own count (the same bytes) answers 431 before h11's 400.
        h11_max_incomplete_event_size=2 * limits.max_header_bytes,
        lifespan="on",
        log_level=settings.log_level,
        # None: uvicorn keeps the logging set up by `configure_logging` (one format for every line).
        log_config=None,
    )
