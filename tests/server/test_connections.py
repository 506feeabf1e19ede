"""The server's edge: connection caps and read timeouts, against the real uvicorn set-up of `serve`.

The attackers are plain sockets on loopback. Those that stand for one attacker come from 127.0.0.2
(and 127.0.0.3 for a second one), so that the per-address cap can be told apart from the total
cap while the honest client stays on 127.0.0.1. Limits are lowered so that a few dozen sockets and
a few seconds show what thousands would.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from server.cli import app
from server.config import ConnectionSettings, Settings
from server.runtime import Runtime
from tests.live import SLUG, LiveServer, live_server, wait_for

LIMITS = ConnectionSettings(
    header_timeout_s=3,
    body_timeout_s=2,
    max_header_bytes=8 * 1024,
    max_connections=40,
    max_connections_per_client=20,
)
# Generous: every limit above is a few seconds; this only bounds a test that would otherwise hang.
BOUND_S = 30
SD3_SERVER = str(Path(sys.executable).with_name("sd3-server"))


@pytest.fixture(scope="module")
def guarded(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("edge") / "ledger.sqlite3"
    yield from live_server(
        settings.model_copy(update={"database_url": f"sqlite:///{db}", "connections": LIMITS}), runtime
    )


def address(live: LiveServer) -> tuple[str, int]:
    url = httpx.URL(live.base_url)
    assert url.host == "127.0.0.1" and url.port is not None
    return url.host, url.port


def partial_head(live: LiveServer, source: str, stack: ExitStack) -> socket.socket:
    """A connection that starts a request and never finishes its headers (slowloris)."""
    sock = stack.enter_context(socket.create_connection(address(live), timeout=5, source_address=(source, 0)))
    with suppress(OSError):  # already closed by the server: the cap at work
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: attacker\r\nx-slow: ")
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed it: reading what has come reaches the end (or a reset)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if sock.recv(65536) == b"":
                return True
        except ConnectionError:
            return True
    return False


def everything_from(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    sock.settimeout(BOUND_S)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def health_answers(live: LiveServer) -> bool:
    try:
        return httpx.get(f"{live.base_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_partial_header_connections_are_capped_per_client_and_closed_after_the_header_timeout(
    guarded: LiveServer,
) -> None:
    with ExitStack() as stack:
        attackers = [partial_head(guarded, "127.0.0.2", stack) for _ in range(200)]
        # The honest client is served while the attacker holds everything it is allowed to hold.
        assert health_answers(guarded)
        # All 180 beyond the per-address cap were closed on arrival; the 20 others only after the
        # header timeout, which has not yet passed for them.
        assert wait_for(lambda: sum(closed_by_server(s) for s in attackers) >= 180, timeout=BOUND_S)
        opened = time.monotonic()
        still_open = [s for s in attackers if not closed_by_server(s)]
        assert len(still_open) <= LIMITS.max_connections_per_client
        assert wait_for(lambda: all(closed_by_server(s) for s in still_open), timeout=BOUND_S)
        assert time.monotonic() - opened < BOUND_S
    assert health_answers(guarded)


def test_the_total_cap_refuses_more_connections_until_the_attackers_time_out(guarded: LiveServer) -> None:
    with ExitStack() as stack:
        attackers = [
            partial_head(guarded, source, stack) for source in ("127.0.0.2", "127.0.0.3") for _ in range(20)
        ]
        # 40 open, the total cap: one more, from anyone, is closed as soon as it is accepted.
        # (It has sent nothing yet: the answer is written before any request is read, and a request
        # already waiting in the socket would turn the close into a reset that drops the answer.)
        late = stack.enter_context(
            socket.create_connection(address(guarded), source_address=("127.0.0.4", 0))
        )
        answer = everything_from(late)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"retry-after: 5\r\n" in answer
        assert answer.endswith(b'{"error": "Too many open connections; retry later"}')
        # The header timeout frees the server again without anyone's help.
        assert wait_for(lambda: all(closed_by_server(s) for s in attackers), timeout=BOUND_S)
    assert wait_for(lambda: health_answers(guarded), timeout=BOUND_S)


def test_a_body_that_never_arrives_is_cut_off_after_the_body_timeout(guarded: LiveServer) -> None:
    head = (
        f"POST /v1/{SLUG} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        "x-api-key: sg_anything\r\ncontent-length: 1000\r\n\r\n"
    ).encode()
    with socket.create_connection(address(guarded), timeout=5, source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(head + b'{"prompt": "')
        assert wait_for(lambda: closed_by_server(sock), timeout=BOUND_S)


def test_headers_above_the_limit_are_431(guarded: LiveServer) -> None:
    with socket.create_connection(address(guarded), timeout=BOUND_S) as sock:
        # 10 KB of headers against a limit of 8 KB, sent at once and no more: the server reads it all,
        # so its close is a clean one and the answer is not lost to a reset.
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"x-filler: " + b"a" * 10_000 + b"\r\n")
        answer = everything_from(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    assert answer.endswith(b'{"error": "Request line and headers too large"}')


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n{}",
        b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["negative-length", "length-and-chunked", "not-http"],
)
def test_a_request_that_cannot_be_parsed_is_a_json_400(guarded: LiveServer, request_bytes: bytes) -> None:
    with socket.create_connection(address(guarded), timeout=BOUND_S) as sock:
        sock.sendall(request_bytes)
        answer = everything_from(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/json" in head
    assert json.loads(body) == {"error": "Invalid HTTP request received."}
    assert health_answers(guarded)


def test_a_kept_alive_connection_serves_several_requests(guarded: LiveServer) -> None:
    with httpx.Client(base_url=guarded.base_url) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200


def test_serve_refuses_a_connection_cap_above_the_open_file_limit(tmp_path: Path) -> None:
    def low_limit() -> None:  # in the child only: 300 descriptors at most, soft and hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    result = subprocess.run(
        [SD3_SERVER, "serve", "--model", "tiny", "--port", "0", "--data-dir", str(tmp_path)],
        env={**os.environ, "SD3_CONNECTIONS__MAX_CONNECTIONS": "512"},
        preexec_fn=low_limit,
        capture_output=True,
        text=True,
        timeout=120,  # a server that did start would never return
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "--max-connections 512 needs 640 open files but this process may open 300 (ulimit -n)" in message
    assert "lower --max-connections (SD3_CONNECTIONS__MAX_CONNECTIONS) below 172" in message


def test_the_rest_of_an_unread_body_is_not_taken_for_a_huge_head(guarded: LiveServer) -> None:
    # 413 from Content-Length alone, before the body is read; the client still sends the body
    # (2 MB, far above the 8 KB head limit) and then its next request on the same connection.
    host, port = address(guarded)
    conn = http.client.HTTPConnection(host, port, timeout=BOUND_S)
    try:
        body = b" " * 2_000_000
        conn.request("POST", f"/v1/{SLUG}", body=body, headers={"content-type": "application/json"})
        first = conn.getresponse()
        first.read()
        assert first.status == 413
        conn.request("GET", "/health")
        second = conn.getresponse()
        assert second.status == 200, second.read()
    finally:
        conn.close()


def test_serve_flags_reach_the_connection_settings(tmp_path: Path) -> None:
    # Each flag is validated as its setting before anything starts: an impossible value is refused.
    for flag, value in [
        ("--header-timeout", "0"),
        ("--body-timeout", "-1"),
        ("--keep-alive", "0"),
        ("--max-header-bytes", "10"),
        ("--max-connections", "0"),
        ("--max-connections-per-client", "-1"),
    ]:
        result = CliRunner().invoke(
            app, ["serve", "--model", "tiny", "--data-dir", str(tmp_path), flag, value]
        )
        assert result.exit_code == 2 and "Invalid settings" in result.output, (flag, result.output)
        assert "connections." in result.output, (flag, result.output)
