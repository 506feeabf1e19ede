"""The one sequence every public surface shares: price → reserve → queue → settle or refund → encode.

Routes call `Serving.txt2img` (wait for the images: v1, OpenAI) or `Serving.submit` (answer at
once, run in the background: v2) and only shape the answer. Credits are reserved (debited)
before any device work, with one atomic conditional update, and given back if anything after
that fails, so a request is charged exactly when it produces images. Every request is recorded
in the job store, which is both the v2 queue's state and the history API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from anyio import to_thread

from pipelines.request import GenerationRequest
from server.config import Settings
from server.encoding import to_jpeg
from server.errors import ApiError, GenerationFailed, InvalidRequest, RateLimited
from server.headers import REMAINING_CREDITS, format_credits
from server.job_store import JobRecord, JobStore, Surface
from server.ledger import KeyRecord, Ledger
from server.metrics import Metrics
from server.pricing import price_of
from server.queue import WorkQueue
from server.rate_limit import RateLimiter
from server.schemas import MAX_SEED, Txt2ImgRequest

if TYPE_CHECKING:
    from server.outputs import OutputStore

log = logging.getLogger(__name__)

MODEL_NAME = "stable-diffusion-3-medium-txt2img"
FAILED_MESSAGE = GenerationFailed.default_message


@dataclass(frozen=True)
class Txt2ImgOutcome:
    request_id: str
    jpegs: list[bytes]
    seed: int
    cost: Decimal
    balance: Decimal
    seconds: float
    outputs: list[str] = field(default_factory=list)  # saved output ids, when asked to keep them


def to_generation_request(body: Txt2ImgRequest, *, seed: int, key_id: int | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        samples=body.samples,
        scheduler=body.scheduler,
        steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        denoise=body.denoise,
        seed=seed,
        width=body.img_width,
        height=body.img_height,
        shift=body.modelsamplingsd3_shift,
        cond_start=body.conditioningsettimesteprange_start,
        cond_stop=body.conditioningsettimesteprange_stop,
        # One key's prompts are cached apart from another's (docs/reliability.md, Request bounds).
        cache_scope="" if key_id is None else f"key:{key_id}",
    )


def resolve_seed(seed: int) -> int:
    # -1 means "random": draw one in the API's own range so that it can be sent back and replayed.
    return secrets.randbelow(MAX_SEED + 1) if seed < 0 else seed


class Serving:
    def __init__(
        self,
        *,
        settings: Settings,
        ledger: Ledger,
        queue: WorkQueue,
        jobs: JobStore,
        outputs: OutputStore,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.queue = queue
        self.jobs = jobs
        self.outputs = outputs
        self.metrics = metrics
        metrics.track_queue(lambda: queue.pending)
        self.rate_limiter = RateLimiter(settings.limits.requests_per_minute)
        self.owner = settings.resolved_instance_id
        self._background: set[asyncio.Task[None]] = set()

    # -- start-up and admission ------------------------------------------------------------------
    async def recover(self) -> None:
        """Resume what this instance left behind when it last stopped (crash, kill -9, restart).

        Accepted v2 jobs still have their credits reserved: they are queued again and run. Every
        other reservation left open (a v1 request cut off mid-generation) is refunded, and its
        history row marked failed.
        """
        resumed = await to_thread.run_sync(lambda: self.jobs.pending(owner=self.owner, surface="v2"))
        for job in resumed:
            self._spawn(job.request_id, job.key_id, Txt2ImgRequest.model_validate(job.params), job.seed)
        keep = {job.request_id for job in resumed}
        refunded = await to_thread.run_sync(lambda: self.ledger.refund_abandoned(self.owner, keep=keep))
        for request_id in refunded:
            await to_thread.run_sync(self._mark_interrupted, request_id)
        if resumed or refunded:
            log.warning("restart: resumed %d v2 job(s), refunded %d request(s)", len(resumed), len(refunded))

    def _mark_interrupted(self, request_id: str) -> None:
        self.jobs.failed(request_id, error="Interrupted: the server stopped during generation; refunded")

    def rate_check(self, key: KeyRecord) -> dict[str, str]:
        """Count this request against the key's rate limit; raise `RateLimited` past it."""
        if not self.rate_limiter.enabled:
            return {}
        decision = self.rate_limiter.check(key.id)
        if not decision.allowed:
            raise RateLimited(
                f"Too many requests: the limit is {self.rate_limiter.per_minute} per minute for this key",
                headers=decision.headers(),
            )
        return decision.headers()

    def price(self, body: Txt2ImgRequest) -> Decimal:
        return price_of(
            width=body.img_width,
            height=body.img_height,
            steps=body.num_inference_steps,
            samples=body.samples,
            pricing=self.settings.pricing,
            scheduler=body.scheduler,
            shift=body.modelsamplingsd3_shift,
            denoise=body.denoise,
            guidance_scale=body.guidance_scale,
        )

    async def check_prompt_tokens(self, body: Txt2ImgRequest) -> None:
        """Refuse (422) a prompt of more CLIP tokens than `limits.max_prompt_tokens`, reserving nothing.

        Counted by the generator's own tokenizer: characters say little (an emoji is several tokens).
        """
        limit = self.settings.limits.max_prompt_tokens
        prompts = {"prompt": body.prompt, "negative_prompt": body.negative_prompt}
        counts = await to_thread.run_sync(
            lambda: {name: self.queue.count_tokens(text) for name, text in prompts.items()}
        )
        for name, count in counts.items():
            if count > limit:
                raise InvalidRequest(f"{name}: {count} CLIP tokens, more than the limit of {limit}")

    async def _admit(
        self, key_id: int, body: Txt2ImgRequest, surface: Surface, request_id: str | None
    ) -> tuple[str, Decimal]:
        """Reserve the price and record the request; raises InsufficientCredits (406) writing nothing."""
        await self.check_prompt_tokens(body)
        request_id = request_id or str(uuid.uuid4())
        cost = self.price(body)
        await to_thread.run_sync(
            lambda: self.ledger.reserve(key_id=key_id, amount=cost, request_id=request_id, owner=self.owner)
        )
        await to_thread.run_sync(
            lambda: self.jobs.create(
                request_id=request_id,
                key_id=key_id,
                surface=surface,
                model=MODEL_NAME,
                params=body.model_dump(mode="json"),
                cost=cost,
                owner=self.owner,
            )
        )
        return request_id, cost

    # -- the shared run --------------------------------------------------------------------------
    async def _run(
        self, request_id: str, key_id: int, body: Txt2ImgRequest, seed: int | None, *, keep_outputs: bool
    ) -> tuple[list[bytes], list[str], int, float]:
        """Generate an admitted request: settle on success; refund and record the failure otherwise."""
        seed = resolve_seed(body.seed) if seed is None else seed
        job = to_generation_request(body, seed=seed, key_id=key_id)
        started = time.perf_counter()
        quality = self.settings.performance.jpeg_quality
        try:
            result = await self.queue.submit(job, progress=self._progress(request_id, seed))
            jpegs = await to_thread.run_sync(
                lambda: [to_jpeg(image, quality=quality) for image in result.images]
            )
            outputs = (
                await to_thread.run_sync(
                    lambda: [self.outputs.save(jpeg, owner_key_id=key_id) for jpeg in jpegs]
                )
                if keep_outputs
                else []
            )
        except ApiError as exc:  # e.g. the queue is full (429): nothing ran, the debit goes back
            self.metrics.failed("refused")
            balance = await self._fail(request_id, exc.message)
            exc.headers[REMAINING_CREDITS] = format_credits(balance)
            raise
        except Exception as exc:  # a failure on the device: refund, and no traceback to the client
            log.exception("generation %s failed", request_id)
            self.metrics.failed("failed")
            balance = await self._fail(request_id, FAILED_MESSAGE)
            raise GenerationFailed(headers={REMAINING_CREDITS: format_credits(balance)}) from exc
        except BaseException:
            # The waiting task was cancelled (client gone, shutdown): no await is safe any more,
            # and the refund is one short transaction, so it runs right here.
            self.metrics.failed("cancelled")
            self.ledger.refund(request_id)
            self.jobs.failed(request_id, error="Cancelled: the client went away or the server stopped")
            raise
        seconds = time.perf_counter() - started
        await to_thread.run_sync(lambda: self.ledger.settle(request_id))
        self.metrics.generated(seconds=seconds, images=len(jpegs), cost=self.price(body))
        await to_thread.run_sync(
            lambda: self.jobs.completed(request_id, outputs=outputs, inference_s=seconds)
        )
        return jpegs, outputs, seed, seconds

    def _progress(self, request_id: str, seed: int) -> Callable[[int, int], None]:
        def on_step(step: int, total: int) -> None:  # runs on the device thread
            if step == 0:
                self.jobs.started(request_id, seed=seed, total=total)
            else:
                self.jobs.progress(request_id, step=step, total=total)

        return on_step

    async def _fail(self, request_id: str, error: str) -> Decimal:
        balance = await to_thread.run_sync(lambda: self.ledger.refund(request_id))
        await to_thread.run_sync(lambda: self.jobs.failed(request_id, error=error))
        return balance

    # -- surfaces --------------------------------------------------------------------------------
    async def txt2img(
        self,
        key: KeyRecord,
        body: Txt2ImgRequest,
        *,
        surface: Surface = "v1",
        keep_outputs: bool = False,
        request_id: str | None = None,
    ) -> Txt2ImgOutcome:
        """Generate now and wait for the images (v1, and OpenAI's synchronous API).

        `request_id` (the HTTP request's own id, when there is one) also names the charge and the
        history row, so one id ties the response header, the logs and the ledger together.
        """
        request_id, cost = await self._admit(key.id, body, surface, request_id)
        jpegs, outputs, seed, seconds = await self._run(
            request_id, key.id, body, None, keep_outputs=keep_outputs
        )
        balance = await to_thread.run_sync(lambda: self.ledger.balance(key.id))
        return Txt2ImgOutcome(request_id, jpegs, seed, cost, balance, seconds, outputs)

    async def submit(
        self, key: KeyRecord, body: Txt2ImgRequest, *, request_id: str | None = None
    ) -> JobRecord:
        """Accept a v2 job: reserve, record it QUEUED, run it in the background."""
        request_id, _ = await self._admit(key.id, body, "v2", request_id)
        self._spawn(request_id, key.id, body, None)
        job = await to_thread.run_sync(lambda: self.jobs.get(request_id))
        assert job is not None
        return job

    def _spawn(self, request_id: str, key_id: int, body: Txt2ImgRequest, seed: int | None) -> None:
        async def run() -> None:
            # A failure is already refunded and recorded as FAILED; the client reads it by polling.
            with contextlib.suppress(ApiError):
                await self._run(request_id, key_id, body, seed, keep_outputs=True)

        task = asyncio.create_task(run(), name=f"v2-{request_id}")
        # The event loop keeps only weak references to tasks.
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def shutdown(self) -> None:
        """Stop background v2 jobs; each one refunds itself and is recorded as failed."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
