"""Shared fixtures: the tiny model built once per session, and a real uvicorn server on loopback.

Everything is real: the tiny SD3 is written as a diffusers folder and loaded by the same code as
real weights, the server is uvicorn on a free loopback port, the ledger a SQLite file, and the
clients are httpx and the official `segmind` SDK.

The web stack and the SDK are imported by the fixtures that use them, so that the pipeline tests also
run where only the engine's packages are installed (benchmarks/gpu_check.sh on a lent GPU machine).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pipelines.tiny import ensure_tiny_model
from server.config import Settings
from server.runtime import Runtime, load_runtime

if TYPE_CHECKING:
    from segmind import SegmindClient

    from tests.live import LiveServer


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sd3-data")


@pytest.fixture(scope="session")
def settings(data_dir: Path) -> Settings:
    # fp32, not auto: on a CPU with native bf16, auto is bf16 (test_loading.py), and the tests that
    # share this runtime compare it with diffusers' and their own fp32 arithmetic.
    return Settings(data_dir=data_dir, model={"id": "tiny", "dtype": "fp32"})


@pytest.fixture(scope="session")
def tiny_dir(settings: Settings) -> Path:
    return ensure_tiny_model(settings.tiny_model_dir)


@pytest.fixture(scope="session")
def runtime(settings: Settings, tiny_dir: Path) -> Runtime:
    return load_runtime(settings)


@pytest.fixture(scope="session")
def live(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    from tests.live import live_server

    db = tmp_path_factory.mktemp("ledger") / "ledger.sqlite3"
    yield from live_server(settings.model_copy(update={"database_url": f"sqlite:///{db}"}), runtime)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """For a test that calls `configure_logging`: the root logger's handlers and levels come back."""
    from server.logs import IMPORT_NARRATORS  # structlog and starlette: not where only the engine is

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        yield
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.getLogger("uvicorn.access").disabled = False
        logging.getLogger("alembic").setLevel(logging.NOTSET)
        for name in IMPORT_NARRATORS:
            logging.getLogger(name).setLevel(logging.NOTSET)


SDK = Callable[..., "SegmindClient"]


@pytest.fixture
def sdk() -> Iterator[SDK]:
    """Makes the official SDK's clients (`sdk(api_key=..., base_url=..., timeout=...)`) and closes them
    after the test: each holds an httpx.Client open and the SDK has no close() of its own, so an
    unclosed one leaks its sockets into whichever later test the garbage collector runs in."""
    from segmind import SegmindClient

    clients: list[SegmindClient] = []

    def make(**kwargs: Any) -> SegmindClient:
        clients.append(SegmindClient(**kwargs))
        return clients[-1]

    yield make
    for client in clients:
        client._client.close()
