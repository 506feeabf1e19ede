"""The work queue in front of the device: bounded, one job at a time, cancellable by job.

A GPU runs one generation efficiently at a time, so jobs run on one worker thread, in order.
The queue is bounded: when `max_pending` jobs are already waiting or running, a new one is
refused at once with `Overloaded` (HTTP 429 + Retry-After) rather than left to time out. A job
whose waiter goes away (client disconnect, task cancelled) is flagged, and the generator stops at
its next step through the step callback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pipelines.request import GenerationCancelled
from server.errors import Overloaded

T = TypeVar("T")
StepCallback = Callable[[int, int], None]


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, step: int, total: int) -> None:
        """A step callback: raise at the next step once the job is cancelled."""
        if self._event.is_set():
            raise GenerationCancelled(f"cancelled at step {step} of {total}")


class WorkQueue:
    def __init__(self, *, max_pending: int, retry_after_s: int) -> None:
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd3-device")
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def has_room(self) -> bool:
        return self._pending < self.max_pending

    async def run(self, job: Callable[[StepCallback], T]) -> T:
        """Run `job(step_callback)` on the device thread; raise `Overloaded` if the queue is full."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise Overloaded(headers={"Retry-After": str(self.retry_after_s)})
            self._pending += 1
        token = CancelToken()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._call, job, token)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            token.cancel()  # the worker stops at its next step; the slot frees when it does
            raise

    def _call(self, job: Callable[[StepCallback], T], token: CancelToken) -> T:
        try:
            if token.cancelled:  # cancelled while still waiting: never touch the device
                raise GenerationCancelled("cancelled before start")
            return job(token.check)
        finally:
            with self._lock:
                self._pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
