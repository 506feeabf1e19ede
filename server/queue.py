"""The work queue in front of the device: bounded, batching, cancellable by job.

One worker thread per device runs the generator, so the event loop never waits for a GPU and
`/health` answers during a generation. The queue is bounded: when `max_pending` jobs are waiting
or running, a new one is refused at once with `Overloaded` (HTTP 429 + Retry-After) instead of
being left to time out. When the worker takes a job, it also takes the waiting jobs that can
share its sampling batch (`batch_key`: same size, steps, scheduler, shift, guidance, window,
denoise) up to `max_batch_images` images and `max_batch_pixels` pixels. A job whose waiter goes
away (client disconnect) is flagged: if it has not started it never runs; a running batch stops
at its next step once every job in it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pipelines.request import GenerationCancelled, GenerationRequest, GenerationResult
from server.errors import Overloaded

StepCallback = Callable[[int, int], None]


class BatchGenerator(Protocol):
    def generate_batch(
        self, requests: list[GenerationRequest], *, callback: StepCallback | None = None
    ) -> list[GenerationResult]: ...

    def count_tokens(self, text: str) -> int: ...


BatchKey = Callable[[GenerationRequest], object | None]


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    key: object | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[GenerationResult]
    progress: StepCallback | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def resolve(self, result: GenerationResult | None, error: BaseException | None) -> None:
        def deliver() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
                # Mark it retrieved: a waiter that is still there gets it all the same, and one that
                # went away (its shield no longer listens) must not leave asyncio logging "Future
                # exception was never retrieved" at ERROR for every cancelled job.
                self.future.exception()
            else:
                self.future.set_result(result)  # type: ignore[arg-type]

        # A closed event loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(deliver)


class WorkQueue:
    def __init__(
        self,
        generator: BatchGenerator,
        *,
        batch_key: BatchKey,
        max_pending: int,
        retry_after_s: int,
        max_batch_images: int = 1,
        max_batch_pixels: int | None = None,
        batch_wait_s: float = 0.0,
    ) -> None:
        self.generator = generator
        self.batch_key = batch_key
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self.max_batch_images = max_batch_images
        self.max_batch_pixels = max_batch_pixels
        self.batch_wait_s = batch_wait_s
        self._waiting: deque[_Job] = deque()
        self._pending = 0  # waiting + running
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="sd3-device", daemon=True)
        self._thread.start()

    def count_tokens(self, text: str) -> int:
        """The generator's count of a prompt's tokens (its own tokenizer; any thread, not the device's)."""
        return self.generator.count_tokens(text)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def has_room(self) -> bool:
        return self._pending < self.max_pending

    async def submit(
        self, request: GenerationRequest, *, progress: StepCallback | None = None
    ) -> GenerationResult:
        """Queue one request and wait for its result; `Overloaded` at once if the queue is full."""
        loop = asyncio.get_running_loop()
        job = _Job(request, self.batch_key(request), loop, loop.create_future(), progress)
        with self._condition:
            if self._stopping or self._pending >= self.max_pending:
                raise Overloaded(retry_after_s=self.retry_after_s)
            self._pending += 1
            self._waiting.append(job)
            self._condition.notify()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancelled.set()  # skipped if still waiting; a running batch stops at its next step
            raise

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is waiting or running, as `queue.Queue.join`; False if `timeout` ran out."""
        with self._condition:
            return self._condition.wait_for(lambda: self._pending == 0, timeout)

    def _image_cap(self, request: GenerationRequest) -> int:
        """How many images of this request's size one batch may hold.

        A batch shares one size, so the pixel budget is a cap on images that depends on the size:
        a GPU that fits four 1024² latents and VAE decodes at once fits sixteen 512² ones.
        """
        if self.max_batch_pixels is None:
            return self.max_batch_images
        return max(1, min(self.max_batch_images, self.max_batch_pixels // (request.width * request.height)))

    def _next_batch(self) -> list[_Job] | None:
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if not self._waiting:
                return None
            first = self._waiting.popleft()
            batch, images = [first], first.request.samples
            # The first job runs whatever its size: it was admitted, and alone it cannot be split.
            cap = self._image_cap(first.request)
            if first.key is None or cap <= images:
                return batch
            # Clients of one burst arrive a few ms apart: without a short wait, the first arrival
            # would run alone and lock in a 1, n-1, 1, n-1 pattern (benchmarks/throughput.py).
            deadline = time.monotonic() + self.batch_wait_s
            while True:
                for job in list(self._waiting):
                    if job.key == first.key and images + job.request.samples <= cap:
                        self._waiting.remove(job)
                        batch.append(job)
                        images += job.request.samples
                remaining = deadline - time.monotonic()
                if images >= cap or remaining <= 0 or self._stopping:
                    return batch
                self._condition.wait(remaining)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if not job.cancelled.is_set()]
            for job in batch:
                if job.cancelled.is_set():
                    job.resolve(None, GenerationCancelled("cancelled before start"))
            try:
                if live:
                    self._run(live)
            finally:
                with self._condition:
                    self._pending -= len(batch)
                    self._condition.notify_all()  # for `join`

    def _run(self, batch: list[_Job]) -> None:
        def on_step(step: int, total: int) -> None:
            if all(job.cancelled.is_set() for job in batch):
                raise GenerationCancelled(f"cancelled at step {step} of {total}")
            for job in batch:
                if job.progress is not None:
                    job.progress(step, total)

        try:
            results = self.generator.generate_batch([job.request for job in batch], callback=on_step)
        except BaseException as exc:  # delivered to every waiter; the worker itself goes on
            for job in batch:
                job.resolve(None, exc)
            return
        for job, result in zip(batch, results, strict=True):
            job.resolve(result, None)

    def shutdown(self) -> None:
        with self._condition:
            self._stopping = True
            for job in self._waiting:
                job.resolve(None, GenerationCancelled("server shutting down"))
            self._pending -= len(self._waiting)
            self._waiting.clear()
            self._condition.notify_all()
        self._thread.join(timeout=60)
