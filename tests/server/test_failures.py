"""When generation fails or the queue is full: the right code, a JSON error, and a full refund."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest
import torch

from server.app import Runtime, load_runtime
from server.config import Settings
from tests.live import SMALL, LiveServer, live_server


@pytest.fixture(scope="module")
def broken(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose (real, tiny) model produces NaN, as an fp16 overflow does on a real GPU."""
    runtime = load_runtime(settings)  # its own copy of the weights: the shared one stays healthy
    with torch.no_grad():
        runtime.generator.pipe.transformer.proj_out.weight.fill_(float("nan"))  # type: ignore[attr-defined]
    db = tmp_path_factory.mktemp("broken") / "ledger.sqlite3"
    yield from live_server(settings.model_copy(update={"database_url": f"sqlite:///{db}"}), runtime)


@pytest.fixture(scope="module")
def narrow(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server that takes one job at a time and no waiting one."""
    db = tmp_path_factory.mktemp("narrow") / "ledger.sqlite3"
    queue = settings.queue.model_copy(update={"max_pending": 1})
    yield from live_server(
        settings.model_copy(update={"database_url": f"sqlite:///{db}", "queue": queue}), runtime
    )


def test_a_failed_generation_is_500_without_traceback_and_refunded(broken: LiveServer) -> None:
    key = broken.key("1")
    response = broken.post({"prompt": "a panda", **SMALL}, key=key)
    assert response.status_code == 500
    body = response.json()
    assert set(body) == {"error"} and "no credits were charged" in body["error"]
    assert "Traceback" not in response.text and "nan" not in response.text.lower()
    assert response.headers["x-remaining-credits"] == "1"
    assert broken.balance_of(key) == Decimal("1")


def test_a_full_queue_is_429_with_retry_after_and_refunded(narrow: LiveServer) -> None:
    key = narrow.key("1")
    slow = {"prompt": "slow", "img_width": 1024, "img_height": 1024, "num_inference_steps": 40}
    first: dict[str, int] = {}
    worker = threading.Thread(target=lambda: first.update(code=narrow.post(slow, key=key).status_code))
    worker.start()
    queue = narrow.app.state.serving.queue  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while queue.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.pending == 1
    response = narrow.post({"prompt": "second", **SMALL}, key=key)
    worker.join()
    assert response.status_code == 429
    assert response.json()["error"].startswith("Too many requests")
    assert int(response.headers["retry-after"]) >= 1
    assert first["code"] == 200
    # Only the first request was charged: 1024x1024 at 40 steps = 0.039 * 1.6
    assert narrow.balance_of(key) == Decimal("1") - Decimal("0.0624")
