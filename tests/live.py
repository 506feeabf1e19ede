"""Helpers for tests that talk to a real uvicorn server on loopback."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.config import Settings
from server.connections import uvicorn_config
from server.ledger import Ledger
from server.runtime import Runtime, load_runtime

SLUG = "stable-diffusion-3-medium-txt2img"
# The smallest request the contract allows: keeps the suite fast where size is not the point.
SMALL = {"img_width": 512, "img_height": 512, "num_inference_steps": 10}


@dataclass
class LiveServer:
    base_url: str
    settings: Settings
    ledger: Ledger
    app: FastAPI
    _names = itertools.count()

    def key(self, credits: str | Decimal = "10") -> str:
        _, key = self.ledger.create_key(name=f"test-{next(self._names)}", credits=Decimal(credits))
        return key

    def balance_of(self, key: str) -> Decimal:
        from server.keys import hash_key

        record = self.ledger.find_by_hash(hash_key(key))
        assert record is not None
        return record.balance

    def post(self, body: dict, *, key: str | None, path: str = f"/v1/{SLUG}", **kwargs) -> httpx.Response:
        headers = {"x-api-key": key} if key is not None else {}
        headers.update(kwargs.pop("headers", {}))
        return httpx.post(self.base_url + path, json=body, headers=headers, timeout=120, **kwargs)


def start_server(
    settings: Settings, runtime: Runtime
) -> tuple[uvicorn.Server, threading.Thread, str, FastAPI]:
    app = create_app(settings, runtime)
    # The same uvicorn set-up as `serve` (connection limits included), on a free loopback port.
    edge = settings.model_copy(update={"host": "127.0.0.1", "port": 0, "log_level": "warning"})
    server = uvicorn.Server(uvicorn_config(app, edge))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}", app


def live_server(settings: Settings, runtime: Runtime) -> Generator[LiveServer, None, None]:
    server, thread, base_url, app = start_server(settings, runtime)
    ledger = Ledger(settings.resolved_database_url)
    try:
        yield LiveServer(base_url, settings, ledger, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        ledger.close()


def twin_server(
    tmp_path_factory: pytest.TempPathFactory, settings: Settings, model_id: str, **model: str
) -> Generator[LiveServer, None, None]:
    """A live server on the tiny twin `model_id` (`tiny:sd3.5-large`, …), its ledger in a new folder."""
    data = tmp_path_factory.mktemp("twin")
    yield from twin_server_at(settings, f"sqlite:///{data / 'ledger.sqlite3'}", data, model_id, **model)


def twin_server_at(
    settings: Settings, url: str, data: Path, model_id: str, *, instance_id: str | None = None, **model: str
) -> Generator[LiveServer, None, None]:
    """A live server on the tiny twin `model_id`, with its own ledger at `url` and data folder."""
    own = settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"id": model_id, **model}),
            "database_url": url,
            "data_dir": data,
            "instance_id": instance_id,
        }
    )
    runtime: Runtime = load_runtime(own)
    yield from live_server(own, runtime)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def job_status_is(status_url: str, status: str, headers: dict[str, str]) -> Callable[[], bool]:
    """For `wait_for`: whether the v2 job at `status_url` has reached `status`."""

    def reached() -> bool:
        return httpx.get(status_url, headers=headers).json()["status"] == status

    return reached


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`sd3-server serve --model tiny` as a real child process, for tests that kill -9 it."""

    def __init__(self, *, data_dir: Path, database: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.database_url = f"sqlite:///{database}"
        self._env = {
            **os.environ,
            "SD3_DATABASE_URL": self.database_url,
            "SD3_DATA_DIR": str(data_dir),
            **(env or {}),
        }
        script = str(Path(sys.executable).with_name("sd3-server"))
        self._command = [script, "serve", "--model", "tiny", "--port", str(self.port)]
        # Popen[str] where a test starts it itself with text=True, to read what it printed.
        self.process: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self._command, env=self._env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert wait_for(self.answers, timeout=60), "the server did not start"

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill_9(self) -> None:
        """SIGKILL: no handler, no refund, no shutdown runs in the process."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
