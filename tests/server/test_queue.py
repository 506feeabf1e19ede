"""The device queue: batching of compatible jobs, bounds, cancellation, a free event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from typing import Any, TypedDict

import httpx
import numpy as np
import pytest

from pipelines.request import GenerationCancelled, GenerationRequest, GenerationResult
from pipelines.sd3 import SD3Generator, StepCallback, batch_key
from server.errors import Overloaded
from server.queue import WorkQueue
from server.runtime import Runtime
from tests.live import LiveServer


class Size(TypedDict):
    """GenerationRequest's size keywords."""

    width: int
    height: int
    steps: int


SMALL: Size = {"width": 512, "height": 512, "steps": 10}


class Blocker:
    """A job source that holds the worker until released, so that others pile up behind it."""

    def __init__(self, generator: SD3Generator) -> None:
        self.generator = generator
        self.started = threading.Event()
        self.release = threading.Event()
        self.batches: list[int] = []

    def generate_batch(
        self, requests: list[GenerationRequest], *, callback: StepCallback | None = None
    ) -> list[GenerationResult]:
        self.batches.append(len(requests))
        if requests[0].prompt == "block":
            self.started.set()
            self.release.wait(30)
        return self.generator.generate_batch(requests, callback=callback)

    def count_tokens(self, text: str) -> int:
        return self.generator.count_tokens(text)


def make_queue(generator: SD3Generator | Blocker, *, max_pending: int = 16, **kwargs: Any) -> WorkQueue:
    return WorkQueue(generator, batch_key=batch_key, max_pending=max_pending, retry_after_s=1, **kwargs)


async def submitted(queue: WorkQueue, *requests: GenerationRequest) -> list[asyncio.Task[GenerationResult]]:
    """Submit `requests` and return once every one of them is in the queue.

    `submit` admits a job before its first await, and the event loop starts tasks in the order they
    were created: one pass of the loop (`sleep(0)`, no timed wait) has admitted them all.
    """
    before = queue.pending
    tasks = [asyncio.create_task(queue.submit(r)) for r in requests]
    await asyncio.sleep(0)
    assert queue.pending == before + len(requests)
    return tasks


async def settled(task: Awaitable[object]) -> None:
    """Wait for a cancelled (or failed) task to finish, whatever it raised."""
    await asyncio.gather(task, return_exceptions=True)


def queued_behind_a_blocker(
    blocker: Blocker, requests: list[GenerationRequest], **queue_options: Any
) -> list[GenerationResult]:
    """Run `requests` queued while the worker is held on a first job; their results, in order.

    They all wait together, so the worker's next batches show what the queue groups.
    """
    queue = make_queue(blocker, **queue_options)

    async def scenario() -> list[GenerationResult]:
        first = asyncio.create_task(queue.submit(GenerationRequest(prompt="block", seed=0, **SMALL)))
        await asyncio.to_thread(blocker.started.wait, 30)
        waiting = await submitted(queue, *requests)
        blocker.release.set()
        await first
        return await asyncio.gather(*waiting)

    try:
        return asyncio.run(scenario())
    finally:
        queue.shutdown()


@pytest.fixture
def generator(runtime: Runtime) -> SD3Generator:
    assert isinstance(runtime.generator, SD3Generator)
    return runtime.generator


@pytest.mark.slow  # seven 512 px generations: the batch, each request again alone (49 s on a busy machine)
def test_compatible_waiting_jobs_run_as_one_batch_and_keep_their_own_images(generator: SD3Generator) -> None:
    blocker = Blocker(generator)
    requests = [GenerationRequest(prompt=f"a house {i}", seed=i, **SMALL) for i in range(3)]
    results = queued_behind_a_blocker(blocker, requests, max_batch_images=4)
    assert blocker.batches == [1, 3]
    for request, result in zip(requests, results, strict=True):
        assert result.seed == request.seed and result.timings["batch"] == 3
        alone = generator.generate(request).images[0].astype(np.float32)
        assert np.abs(alone - result.images[0]).mean() < 0.5  # the same image, up to batch rounding


def test_incompatible_or_stochastic_jobs_are_not_batched(generator: SD3Generator) -> None:
    blocker = Blocker(generator)
    others = [
        GenerationRequest(prompt="a", seed=1, **SMALL),
        GenerationRequest(prompt="b", seed=1, width=520, height=512, steps=10),  # another size
        GenerationRequest(prompt="c", seed=1, scheduler="Euler a", **SMALL),  # per-step noise
        GenerationRequest(prompt="d", seed=1, scheduler="Euler a", **SMALL),
    ]
    queued_behind_a_blocker(blocker, others, max_batch_images=8)
    assert blocker.batches == [1, 1, 1, 1, 1]


def test_the_batch_respects_the_image_budget(generator: SD3Generator) -> None:
    blocker = Blocker(generator)
    requests = [GenerationRequest(prompt="x", seed=i, samples=2, **SMALL) for i in range(3)]
    queued_behind_a_blocker(blocker, requests, max_batch_images=3)
    assert blocker.batches == [1, 1, 1, 1]  # 2 + 2 images would exceed 3


@pytest.mark.slow
def test_the_pixel_budget_caps_a_batch_by_its_size(generator: SD3Generator) -> None:
    blocker = Blocker(generator)
    # Two 512² images' worth of pixels: 512² jobs pair up, a 1024² job (4x the pixels) runs alone,
    # and so does a first job already over the budget by itself (3 samples).
    small = [GenerationRequest(prompt="x", seed=i, **SMALL) for i in range(3)]
    large = [GenerationRequest(prompt="x", seed=i, width=1024, height=1024, steps=10) for i in range(2)]
    alone = GenerationRequest(prompt="x", seed=9, samples=3, width=512, height=512, steps=11)
    results = queued_behind_a_blocker(
        blocker, [*small, *large, alone], max_batch_images=8, max_batch_pixels=2 * 512 * 512
    )
    assert len(results[-1].images) == 3
    assert blocker.batches == [1, 2, 1, 1, 1, 1]


def test_a_full_queue_refuses_at_once_and_a_cancelled_waiting_job_never_runs(generator: SD3Generator) -> None:
    blocker = Blocker(generator)
    queue = make_queue(blocker, max_pending=2)

    async def scenario() -> None:
        first = asyncio.create_task(queue.submit(GenerationRequest(prompt="block", seed=0, **SMALL)))
        await asyncio.to_thread(blocker.started.wait, 30)
        (second,) = await submitted(queue, GenerationRequest(prompt="second", seed=0, **SMALL))
        with pytest.raises(Overloaded):
            await queue.submit(GenerationRequest(prompt="third", seed=0, **SMALL))
        second.cancel()
        await settled(second)  # its job is flagged cancelled once the task has finished
        blocker.release.set()
        await first
        assert await asyncio.to_thread(queue.join, 30)

    try:
        asyncio.run(scenario())
    finally:
        queue.shutdown()
    assert blocker.batches == [1]  # "second" was cancelled while waiting: it never reached the device
    assert queue.pending == 0


def test_a_running_job_stops_at_the_next_step_when_cancelled(generator: SD3Generator) -> None:
    queue = make_queue(generator)
    steps: list[int] = []

    stepped = threading.Event()

    def progress(step: int, total: int) -> None:
        steps.append(step)
        stepped.set()

    async def scenario() -> None:
        job = asyncio.create_task(
            queue.submit(
                GenerationRequest(prompt="long", seed=0, width=1024, height=1024, steps=100),
                progress=progress,
            )
        )
        assert await asyncio.to_thread(stepped.wait, 30)
        job.cancel()
        await settled(job)
        assert await asyncio.to_thread(queue.join, 30)

    try:
        asyncio.run(scenario())
    finally:
        queue.shutdown()
    assert queue.pending == 0 and len(steps) < 100


@pytest.mark.slow
def test_health_answers_while_the_device_is_busy(live: LiveServer) -> None:
    key = live.key()
    slow = {"prompt": "slow", "img_width": 1024, "img_height": 1024, "num_inference_steps": 60}
    worker = threading.Thread(target=lambda: live.post(slow, key=key))
    worker.start()
    queue = live.app.state.serving.queue
    while queue.pending == 0:
        time.sleep(0.01)
    started = time.perf_counter()
    response = httpx.get(f"{live.base_url}/health")
    elapsed = time.perf_counter() - started
    assert response.status_code == 200 and queue.pending == 1
    worker.join()
    assert elapsed < 0.5


def test_shutdown_fails_waiting_jobs_instead_of_leaving_them(generator: SD3Generator) -> None:
    blocker = Blocker(generator)
    queue = make_queue(blocker)

    async def scenario() -> None:
        first = asyncio.create_task(queue.submit(GenerationRequest(prompt="block", seed=0, **SMALL)))
        await asyncio.to_thread(blocker.started.wait, 30)
        (waiting,) = await submitted(queue, GenerationRequest(prompt="w", seed=0, **SMALL))
        stopper = asyncio.create_task(asyncio.to_thread(queue.shutdown))
        # Shutdown fails the waiting job at once, while the running one still holds the worker.
        with pytest.raises(GenerationCancelled):
            await waiting
        blocker.release.set()
        await stopper
        await first

    asyncio.run(scenario())


def test_a_short_batch_wait_lets_a_burst_of_arrivals_share_one_batch(generator: SD3Generator) -> None:
    blocker = Blocker(generator)
    queue = make_queue(blocker, max_batch_images=3, batch_wait_s=0.5)

    async def scenario() -> None:
        jobs = []
        for i in range(3):  # arrivals 50 ms apart, on an idle device: the timing is the scenario
            jobs.append(asyncio.create_task(queue.submit(GenerationRequest(prompt=f"p{i}", seed=i, **SMALL))))
            await asyncio.sleep(0.05)
        await asyncio.gather(*jobs)

    try:
        asyncio.run(scenario())
    finally:
        queue.shutdown()
    assert blocker.batches == [3]
