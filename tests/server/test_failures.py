"""When generation fails or the queue is full: the right code, a JSON error, and a full refund."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest
import torch

from pipelines.sd3 import SD3Generator
from server.config import Settings
from server.runtime import Runtime, load_runtime
from tests.live import SLUG, SMALL, LiveServer, live_server, wait_for

# Holds the device for seconds on the tiny model, so that what comes after it finds the queue full.
SLOW = {"prompt": "slow", "img_width": 1024, "img_height": 1024, "num_inference_steps": 40}


@pytest.fixture(scope="module")
def broken(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose (real, tiny) model produces NaN, as an fp16 overflow does on a real GPU."""
    runtime = load_runtime(settings)  # its own copy of the weights: the shared one stays healthy
    assert isinstance(runtime.generator, SD3Generator)
    with torch.no_grad():
        runtime.generator.pipe.transformer.proj_out.weight.fill_(float("nan"))
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


@pytest.mark.slow
def test_a_full_queue_is_429_with_retry_after_and_refunded(narrow: LiveServer) -> None:
    key = narrow.key("1")
    slow = {"prompt": "slow", "img_width": 1024, "img_height": 1024, "num_inference_steps": 40}
    first: dict[str, int] = {}
    worker = threading.Thread(target=lambda: first.update(code=narrow.post(slow, key=key).status_code))
    worker.start()
    queue = narrow.app.state.serving.queue
    deadline = time.monotonic() + 30
    while queue.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.pending == 1
    response = narrow.post({"prompt": "second", **SMALL}, key=key)
    worker.join()
    assert response.status_code == 429
    assert response.json()["error"].startswith("Too many requests")
    assert int(response.headers["retry-after"]) >= 1 and response.headers["x-rate-limit-reset-at-utc"]
    assert first["code"] == 200
    # Only the first request was charged: 1024x1024 at 40 steps = 0.039 * 1.6
    assert narrow.balance_of(key) == Decimal("1") - Decimal("0.0624")


@pytest.fixture(scope="module")
def door(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One job on the device at a time, and at most four accepted v2 jobs."""
    db = tmp_path_factory.mktemp("door") / "ledger.sqlite3"
    queue = settings.queue.model_copy(update={"max_pending": 1, "max_accepted_jobs": 4})
    yield from live_server(
        settings.model_copy(update={"database_url": f"sqlite:///{db}", "queue": queue}), runtime
    )


def _burst(server: LiveServer, key: str, count: int) -> list[httpx.Response]:
    """A v2 job that holds the device, then `count` more submitted at once, as a client's burst."""
    holder = server.post(SLOW, key=key, path=f"/v2/{SLUG}").json()
    assert wait_for(
        lambda: httpx.get(holder["status_url"], headers={"x-api-key": key}).json()["status"] == "PROCESSING"
    )

    def submit(i: int) -> httpx.Response:
        return server.post({"prompt": f"burst {i}", **SMALL}, key=key, path=f"/v2/{SLUG}")

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(submit, range(count)))


def _finished(server: LiveServer, key: str, job: dict) -> str:
    status: dict[str, object] = {}
    assert wait_for(
        lambda: (
            status.update(httpx.get(job["status_url"], headers={"x-api-key": key}).json())
            or status["status"] in ("COMPLETED", "FAILED")
        ),
        timeout=240,
    )
    return str(status["status"])


@pytest.mark.slow
def test_accepted_v2_jobs_wait_for_room_in_a_full_queue_and_all_complete(narrow: LiveServer) -> None:
    # max_pending 1: every job of the burst finds the device queue full, and none may fail for it.
    key = narrow.key("1")
    burst = _burst(narrow, key, 6)
    assert [response.status_code for response in burst] == [200] * 6
    assert [_finished(narrow, key, response.json()) for response in burst] == ["COMPLETED"] * 6
    assert all(row.ok and row.open_reservations == 0 for row in narrow.ledger.audit())


@pytest.mark.slow
def test_past_the_accepted_jobs_bound_a_submission_is_429_at_the_door_and_charged_nothing(
    door: LiveServer,
) -> None:
    key = door.key("1")
    burst = _burst(door, key, 6)
    accepted = [response for response in burst if response.status_code == 200]
    refused = [response for response in burst if response.status_code == 429]
    assert len(accepted) == 3 and len(refused) == 3  # four accepted jobs in all, the holder included
    for response in refused:
        assert int(response.headers["retry-after"]) >= 1 and response.headers["x-rate-limit-reset-at-utc"]
        assert response.json()["error"].startswith("Too many requests")
    assert [_finished(door, key, response.json()) for response in accepted] == ["COMPLETED"] * 3
    # Charged: the holder (1024² at 40 steps) and three 512² jobs at 10 steps; the refused ones nothing.
    assert door.balance_of(key) == Decimal(1) - Decimal("0.0624") - 3 * Decimal("0.0039")
