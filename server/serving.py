"""The one sequence every public surface shares: rate limit → price → reserve → queue → settle or
refund → encode.

Routes call `Serving.txt2img` (wait for the images: v1, OpenAI) or `Serving.submit` (answer at
once, run in the background: v2), or one of the reads (`authenticate`, `own_job`, `job_result`,
`history`, `readiness`), and only shape the answer: rate limits, balances and job ownership are
decided here. Credits are reserved (debited) before any device work, with one atomic conditional
update, and given back if anything after that fails, so a request is charged exactly when it
produces images. Every request is recorded in the job store, which is both the v2 queue's state and
the history API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from anyio import to_thread
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from pipelines.options import Family, StepCacheLevel
from pipelines.request import GenerationRequest, GenerationResult
from server.auth import authenticate
from server.config import Settings
from server.encoding import encode_as
from server.errors import (
    ApiError,
    ChargeAlreadyFinal,
    ChargeNotFound,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    Overloaded,
    RateLimited,
)
from server.headers import REMAINING_CREDITS, format_credits
from server.image_input import InputImage, read_image
from server.job_store import JobRecord, JobStore, Surface
from server.key_admin import KeyAdmin
from server.ledger import KeyRecord, Ledger
from server.metrics import Metrics
from server.pricing import img2img_price, price_of, sd35_price
from server.queue import WorkQueue
from server.rate_limit import RateLimiter
from server.schemas import (
    IMAGE_FORMATS,
    IMG2IMG_SLUG,
    MAX_SEED,
    SD35_REQUESTS,
    SERVED_SLUGS,
    SLUG,
    Img2ImgRequest,
    SD35Request,
    Txt2ImgRequest,
    not_served_message,
    recorded_params,
)

if TYPE_CHECKING:
    from server.outputs import OutputStore

log = logging.getLogger(__name__)

MODEL_NAME = SLUG
FAILED_MESSAGE = GenerationFailed.default_message
CANCELLED_MESSAGE = "Cancelled: the client went away or the server stopped; refunded"
# A write the database refused (locked past its busy timeout, disk full) is tried again after this
# long, doubling up to the cap, until it lands.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
# At shutdown, how long writes still being retried get to land; what is left, the next start's
# recovery does (a reservation is refunded, an accepted v2 job resumed).
SHUTDOWN_DRAIN_S = 10.0
# How often an accepted v2 job looks for room in a full device queue.
QUEUE_ROOM_POLL_S = 0.2
# How long a readiness check waits for the database: a load balancer's probe must get an answer, not
# hang on a stuck file or server, and a healthy database answers these reads in milliseconds.
DATABASE_CHECK_TIMEOUT_S = 2.0
T = TypeVar("T")


def _reason(exc: BaseException) -> str:
    # The driver's own message ("database is locked"), not SQLAlchemy's text with the statement
    # and its bound parameters (which may hold a key's hash).
    return str(getattr(exc, "orig", None) or exc)


INTERRUPTED = "Interrupted: the server stopped during generation; refunded"


class PendingWrites:
    """Database writes that must land: refunds, failure and completion records.

    Each runs in a worker thread, never on the event loop, in its own task, so that the cancelled
    request that asked for it cannot interrupt it; a write the database refuses is retried with
    backoff until it lands. Every write given here is idempotent (a refund flips `reserved` once;
    job transitions are conditional), so running one twice is harmless.
    """

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[None], str] = {}

    @property
    def pending(self) -> list[str]:
        """The names of the writes not landed yet."""
        return list(self._tasks.values())

    def run(self, name: str, write: Callable[[], T]) -> asyncio.Future[T | None]:
        """Start `write`; the future resolves after its first attempt: its result, or None if that
        failed (the retries then go on in the background)."""
        first: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()

        async def attempts() -> None:
            delay = RETRY_FIRST_S
            while True:
                try:
                    result = await to_thread.run_sync(write)
                except Exception as exc:
                    log.warning("%s did not land (%s); retrying in %.1f s", name, _reason(exc), delay)
                    if not first.done():
                        first.set_result(None)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                else:
                    if not first.done():
                        first.set_result(result)
                    return

        task = asyncio.create_task(attempts(), name=name)
        self._tasks[task] = name
        task.add_done_callback(self._tasks.pop)
        return first

    async def drain(self, timeout_s: float) -> None:
        """Give the pending writes `timeout_s` to land, then stop retrying the rest."""
        if not self._tasks:
            return
        _, left = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in left:
            log.warning("%s still not landed at shutdown: the next start's recovery does it", task.get_name())
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)


@dataclass(frozen=True)
class Txt2ImgOutcome:
    request_id: str
    images: list[bytes]  # encoded as `media_type`
    seed: int
    cost: Decimal
    balance: Decimal
    seconds: float
    outputs: list[str] = field(default_factory=list)  # saved output ids, when asked to keep them
    rate_headers: dict[str, str] = field(default_factory=dict)  # the key's rate limit, where one is on
    media_type: str = "image/jpeg"


@dataclass(frozen=True)
class Submission:
    """An accepted v2 job, as its submitter is told about it."""

    job: JobRecord
    balance: Decimal  # after the reservation
    rate_headers: dict[str, str]


@dataclass(frozen=True)
class Readiness:
    database_problem: str | None  # what is wrong with the database, in its own words; None if nothing
    pending: int
    max_pending: int
    has_room: bool

    @property
    def ok(self) -> bool:
        return self.has_room and self.database_problem is None


@dataclass(frozen=True)
class JobResult:
    job: JobRecord
    balance: Decimal | None  # the owner's balance, read only for a completed job's metrics


@dataclass(frozen=True)
class Work:
    """An admitted request as the shared run needs it, whatever its slug: what to record, what to
    generate (its seed still as sent: -1 is drawn at run time) and what it costs."""

    model: str  # the slug, as the history names it
    params: dict[str, Any]  # the body, recorded; a v2 job is rebuilt from it after a restart
    request: GenerationRequest
    cost: Decimal
    image_format: str = "jpeg"  # a key of schemas.IMAGE_FORMATS
    image_quality: int | None = None  # None: the server's `performance.jpeg_quality`

    @property
    def prompts(self) -> dict[str, str]:
        return {"prompt": self.request.prompt, "negative_prompt": self.request.negative_prompt}

    def waiting(self) -> Work:
        """This work as an accepted v2 job keeps it while it waits: without its recorded body and
        decoded image (megabytes each, and up to `queue.max_accepted_jobs` jobs wait), which the run
        reads back from the job's row (`Serving._with_image`)."""
        return replace(self, params={}, request=replace(self.request, init_image=None))


def _cache_scope(key_id: int | None) -> str:
    """One key's prompts are cached apart from another's (docs/reliability.md, Request bounds)."""
    return "" if key_id is None else f"key:{key_id}"


def to_generation_request(
    body: Txt2ImgRequest, *, seed: int, key_id: int | None = None, step_cache: StepCacheLevel = "off"
) -> GenerationRequest:
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
        cache_scope=_cache_scope(key_id),
        step_cache=body.cache or step_cache,
    )


def img2img_generation_request(
    body: Img2ImgRequest,
    image: InputImage,
    *,
    seed: int,
    key_id: int | None = None,
    step_cache: StepCacheLevel = "off",
) -> GenerationRequest:
    """The generator's job for an img2img body whose image is decoded (docs/contract.md, img2img)."""
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        samples=body.samples,
        scheduler=body.sampler,
        schedule=body.scheduler,
        steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        denoise=body.strength,
        seed=seed,
        width=image.width,
        height=image.height,
        init_image=image.pixels,
        cache_scope=_cache_scope(key_id),
        step_cache=body.cache or step_cache,
    )


def sd35_generation_request(
    body: SD35Request,
    *,
    seed: int,
    negative_window: bool,
    key_id: int | None = None,
    step_cache: StepCacheLevel = "off",
) -> GenerationRequest:
    """The generator's job for an SD3.5 body: shift 3, the model's default (docs/contract.md §8)."""
    width, height = body.size
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        samples=body.batch_size,
        scheduler=body.sampler,
        schedule=body.scheduler,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=seed,
        width=width,
        height=height,
        negative_window=negative_window,
        cache_scope=_cache_scope(key_id),
        step_cache=body.cache or step_cache,
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
        family: Family = "sd3-medium",
    ) -> None:
        self.settings = settings
        self.family = family  # of the loaded weights: which slugs this server answers
        self.ledger = ledger
        self.queue = queue
        self.jobs = jobs
        self.outputs = outputs
        self.metrics = metrics
        self.admin = KeyAdmin(ledger, settings.admin_token)
        metrics.track_queue(lambda: queue.pending)
        self.rate_limiter = RateLimiter(settings.limits.requests_per_minute)
        self.owner = settings.resolved_instance_id
        self.writes = PendingWrites()
        self._background: dict[asyncio.Task[None], str] = {}  # running v2 jobs, by request id
        self._admitting = 0  # v2 submissions between the accepted-jobs check and their task
        self._stopping = False
        self._database_check: asyncio.Future[None] | None = None  # the readiness probe in flight

    # -- start-up and undo -----------------------------------------------------------------------
    async def recover(self) -> None:
        """Resume what this instance left behind when it last stopped (crash, kill -9, restart).

        Accepted v2 jobs still have their credits reserved: they are queued again and run. Every
        other reservation left open (a v1 request cut off mid-generation) is refunded, and its
        history row marked failed.
        """
        pending = await to_thread.run_sync(lambda: self.jobs.pending(owner=self.owner, surface="v2"))
        resumed = []
        for job in pending:
            try:
                work = await self._recorded_work(job)
            except ApiError as exc:
                # An img2img image this server no longer takes (its limits changed): refunded below.
                log.warning("v2 job %s cannot be resumed: %s", job.request_id, exc.message)
                continue
            self._spawn(job.request_id, job.key_id, work.waiting(), job.seed)
            resumed.append(job)
        keep = {job.request_id for job in resumed}
        refunded = await to_thread.run_sync(lambda: self.ledger.abandoned(self.owner, keep=keep))
        for request_id in refunded:
            # Failed, then refunded, as `_undo_now` does: no reader sees a refunded job still
            # PROCESSING, and a crash between the two leaves the reservation for the next start.
            await to_thread.run_sync(self._undo_now, request_id, INTERRUPTED)
        if resumed or refunded:
            log.warning("restart: resumed %d v2 job(s), refunded %d request(s)", len(resumed), len(refunded))

    async def _recorded_work(self, job: JobRecord) -> Work:
        """The work of a recorded v2 job, rebuilt from its body (its price is the one it was charged)."""
        if job.model in SD35_REQUESTS:
            return replace(
                self.sd35_work(job.key_id, SD35_REQUESTS[job.model].model_validate(job.params)), cost=job.cost
            )
        if job.model == IMG2IMG_SLUG:
            return replace(
                await self.img2img_work(job.key_id, Img2ImgRequest.model_validate(job.params)), cost=job.cost
            )
        return replace(
            self.txt2img_work(job.key_id, Txt2ImgRequest.model_validate(job.params)), cost=job.cost
        )

    def _undo_now(self, request_id: str, error: str) -> Decimal:
        """Record the request as failed, then give its credits back; the balance after.

        In this order: if only the first write lands, the next start refunds the reservation of a
        finished job; the other order could leave a refunded v2 job QUEUED, to be run for free.
        """
        self.jobs.failed(request_id, error=error)
        return self.ledger.refund(request_id)

    def _undo(self, request_id: str, error: str) -> asyncio.Future[Decimal | None]:
        return self.writes.run(f"refund {request_id}", partial(self._undo_now, request_id, error))

    # -- reads -----------------------------------------------------------------------------------
    @property
    def served_slugs(self) -> tuple[str, ...]:
        return SERVED_SLUGS[self.family]

    @property
    def txt2img_slug(self) -> str:
        """The loaded family's txt2img slug, which surfaces without slugs of their own (OpenAI) run."""
        return self.served_slugs[0]

    def require_served(self, slug: str) -> None:
        """`NotFound` (404) for a slug of the SD3 family that the loaded weights do not serve."""
        if slug not in self.served_slugs:
            raise NotFound(not_served_message(slug, family=self.family, model_id=self.settings.model.id))

    async def authenticate(self, api_key: str | None) -> KeyRecord:
        """The key record of `api_key`; `MissingApiKey` or `Unauthorized` (401) otherwise."""
        return await to_thread.run_sync(authenticate, self.ledger, api_key)

    async def own_job(self, key: KeyRecord, request_id: str) -> JobRecord:
        """A v2 job of this key still within its retention; to any other key it does not exist (404)."""
        job = await to_thread.run_sync(self.jobs.get, request_id)
        retention = timedelta(seconds=self.settings.jobs.result_retention_s)
        if (
            job is None
            or job.key_id != key.id
            or job.surface != "v2"
            or datetime.now(timezone.utc) - job.created_at > retention
        ):
            raise NotFound(f"No request {request_id} for this API key (results are kept {retention})")
        return job

    async def job_result(self, key: KeyRecord, request_id: str) -> JobResult:
        """`own_job`, with the owner's balance once the job has completed."""
        job = await self.own_job(key, request_id)
        if job.status != "COMPLETED":
            return JobResult(job, None)
        return JobResult(job, await to_thread.run_sync(self.ledger.balance, job.key_id))

    async def history(
        self, key: KeyRecord, *, limit: int, before: datetime | None, before_id: str | None
    ) -> list[JobRecord]:
        """The key's requests, newest first, whatever surface they came through."""
        return await to_thread.run_sync(
            lambda: self.jobs.history(key.id, limit=limit, before=before, before_id=before_id)
        )

    async def readiness(self) -> Readiness:
        """Whether the database answers the reads every request makes and the queue takes new jobs."""
        queue = self.queue
        problem = await self._database_problem()
        return Readiness(problem, queue.pending, queue.max_pending, queue.has_room)

    async def _database_problem(self) -> str | None:
        """None when the ledger's probe passes; else what is wrong, in the database's own words.

        Off the event loop, and one probe at a time: probes sent while one is stuck wait for that one
        instead of each taking a worker thread.
        """
        check = self._database_check
        if check is None or check.done():
            check = asyncio.ensure_future(to_thread.run_sync(self.ledger.probe))
            # Retrieved here, so that a probe finishing after its waiters gave up is not logged as lost.
            check.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._database_check = check
        try:
            await asyncio.wait_for(asyncio.shield(check), DATABASE_CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"the database did not answer within {DATABASE_CHECK_TIMEOUT_S:g} s"
        except DBAPIError as exc:
            # The driver's message alone: no statement, no parameters.
            return f"the database failed: {exc.orig}"
        except SQLAlchemyError as exc:
            return f"the database failed: {type(exc).__name__}"
        return None

    # -- admission -------------------------------------------------------------------------------
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

    def sd35_work(self, key_id: int | None, body: SD35Request) -> Work:
        width, height = body.size
        job = sd35_generation_request(
            body,
            seed=body.seed,
            negative_window=self.settings.sampling.sd35_negative == "window",
            key_id=key_id,
            step_cache=self.settings.performance.step_cache,
        )
        cost = sd35_price(
            slug=body.slug,
            width=width,
            height=height,
            steps=body.steps,
            images=body.batch_size,
            pricing=self.settings.pricing,
            sampler=body.sampler,
            schedule=body.scheduler,
            guidance_scale=body.guidance_scale,
        )
        params = body.model_dump(mode="json")
        return Work(
            body.slug, params, job, cost, image_format=body.image_format, image_quality=body.image_quality
        )

    def txt2img_work(self, key_id: int | None, body: Txt2ImgRequest) -> Work:
        job = to_generation_request(
            body, seed=body.seed, key_id=key_id, step_cache=self.settings.performance.step_cache
        )
        return Work(MODEL_NAME, body.model_dump(mode="json"), job, self.price(body))

    async def img2img_work(self, key_id: int | None, body: Img2ImgRequest) -> Work:
        """Decode the body's image (in a worker thread) and price the request by the output size;
        a bad image is InvalidRequest (422), before anything is reserved."""
        limits = self.settings.limits
        image = await to_thread.run_sync(lambda: read_image(body.image, limits))
        job = img2img_generation_request(
            body, image, seed=body.seed, key_id=key_id, step_cache=self.settings.performance.step_cache
        )
        cost = img2img_price(
            width=image.width,
            height=image.height,
            steps=body.num_inference_steps,
            samples=body.samples,
            pricing=self.settings.pricing,
            sampler=body.sampler,
            schedule=body.scheduler,
            guidance_scale=body.guidance_scale,
            strength=body.strength,
        )
        return Work(IMG2IMG_SLUG, body.model_dump(mode="json"), job, cost)

    async def check_prompt_tokens(self, prompts: dict[str, str]) -> None:
        """Refuse (422) a prompt of more CLIP tokens than `limits.max_prompt_tokens`, reserving nothing.

        Counted by the generator's own tokenizer: characters say little (an emoji is several tokens).
        """
        limit = self.settings.limits.max_prompt_tokens
        counts = await to_thread.run_sync(
            lambda: {name: self.queue.count_tokens(text) for name, text in prompts.items()}
        )
        for name, count in counts.items():
            if count > limit:
                raise InvalidRequest(f"{name}: {count} CLIP tokens, more than the limit of {limit}")

    async def _admit(
        self, key_id: int, work: Work, surface: Surface, request_id: str | None
    ) -> tuple[str, Decimal]:
        """Reserve the price and record the request; raises InsufficientCredits (406) writing nothing.

        Admission and its undo are one unit that a cancellation cannot split. The writes run in
        worker threads, which go on when the waiting request is cancelled (client gone, shutdown):
        so the admission runs in its own task, shielded, and if it lands after its waiter left, it
        is undone at once (job failed, credits refunded) instead of leaving a charge nobody settles.
        """
        await self.check_prompt_tokens(work.prompts)
        request_id = request_id or str(uuid.uuid4())
        cost = work.cost
        admission = asyncio.ensure_future(self._reserve_and_record(key_id, work, surface, request_id))
        try:
            await asyncio.shield(admission)
        except asyncio.CancelledError:
            admission.add_done_callback(partial(self._undo_if_admitted, request_id))
            raise
        return request_id, cost

    async def _reserve_and_record(self, key_id: int, work: Work, surface: Surface, request_id: str) -> None:
        cost = work.cost
        await to_thread.run_sync(
            lambda: self.ledger.reserve(key_id=key_id, amount=cost, request_id=request_id, owner=self.owner)
        )
        try:
            await to_thread.run_sync(
                lambda: self.jobs.create(
                    request_id=request_id,
                    key_id=key_id,
                    surface=surface,
                    model=work.model,
                    # Only a v2 job is ever rebuilt from its row (restart, or its image read back when
                    # it runs); elsewhere an img2img image would be megabytes of history, so it is not kept.
                    params=work.params if surface == "v2" else recorded_params(work.params),
                    cost=cost,
                    owner=self.owner,
                )
            )
        except Exception:
            # Without its job row nobody would settle or refund the reservation until a restart.
            # (Cancelled here only when the event loop itself is closing: then the next start's
            # recovery refunds or resumes it, whichever of the two writes landed.)
            self.writes.run(f"refund {request_id}", partial(self.ledger.refund, request_id))
            raise

    def _undo_if_admitted(self, request_id: str, admission: asyncio.Future[None]) -> None:
        if admission.cancelled() or admission.exception() is not None:
            return  # nothing was reserved, or _reserve_and_record is already giving it back
        self.metrics.failed("cancelled")
        self._undo(request_id, CANCELLED_MESSAGE)

    # -- the shared run --------------------------------------------------------------------------
    async def _run(
        self,
        request_id: str,
        key_id: int,
        work: Work,
        seed: int | None,
        *,
        surface: Surface,
        keep_outputs: bool,
    ) -> tuple[list[bytes], list[str], int, float]:
        """Generate an admitted request: settle on success; refund and record the failure otherwise."""
        seed = resolve_seed(work.request.seed) if seed is None else seed
        job = replace(work.request, seed=seed)
        started = time.perf_counter()
        quality = work.image_quality or self.settings.performance.jpeg_quality
        try:
            job = await self._with_image(request_id, job, work.model)
            result = await self._submit(job, request_id, seed, waits=surface == "v2")
            encoded = await to_thread.run_sync(
                lambda: [encode_as(image, work.image_format, quality=quality) for image in result.images]
            )
            outputs = (
                await to_thread.run_sync(
                    lambda: [
                        self.outputs.save(data, owner_key_id=key_id, image_format=work.image_format)
                        for data in encoded
                    ]
                )
                if keep_outputs
                else []
            )
        except ApiError as exc:  # e.g. the queue is full (429): nothing ran, the debit goes back
            self.metrics.failed("refused")
            balance = await self._fail(request_id, exc.message)
            if balance is not None:
                exc.headers[REMAINING_CREDITS] = format_credits(balance)
            raise
        except Exception as exc:  # a failure on the device: refund, and no traceback to the client
            log.exception("generation %s failed", request_id)
            self.metrics.failed("failed")
            balance = await self._fail(request_id, FAILED_MESSAGE)
            headers = {} if balance is None else {REMAINING_CREDITS: format_credits(balance)}
            raise GenerationFailed(headers=headers) from exc
        except BaseException:
            # The waiting task was cancelled (client gone, shutdown). The undo runs in its own task,
            # off the event loop, retried until it lands. An accepted v2 job cancelled by a stopping
            # server is not undone: it keeps its reservation and the next start runs it (shutdown).
            self.metrics.failed("cancelled")
            if not (surface == "v2" and self._stopping):
                self._undo(request_id, CANCELLED_MESSAGE)
            raise
        seconds = time.perf_counter() - started
        self.metrics.generated(seconds=seconds, images=len(encoded), cost=work.cost)
        # The images exist and their price was taken at admission: settling (reserved → settled) and
        # the history row must land, so they go to the pending writes, which retry them if refused.
        settle = partial(self._settle_now, request_id, outputs=outputs, seconds=seconds)
        await asyncio.shield(self.writes.run(f"settle {request_id}", settle))
        return encoded, outputs, seed, seconds

    async def _with_image(self, request_id: str, job: GenerationRequest, model: str) -> GenerationRequest:
        """An img2img job that waited without its image (`Work.waiting`) gets it back, decoded again
        from its recorded body; the decode is deterministic, so it is the image priced at the door."""
        if model != IMG2IMG_SLUG or job.init_image is not None:
            return job
        record = await to_thread.run_sync(self.jobs.get, request_id)
        if record is None:
            raise NotFound(f"No request {request_id}")
        body = Img2ImgRequest.model_validate(record.params)
        limits = self.settings.limits
        image = await to_thread.run_sync(lambda: read_image(body.image, limits))
        return replace(job, init_image=image.pixels)

    async def _submit(
        self, job: GenerationRequest, request_id: str, seed: int, *, waits: bool
    ) -> GenerationResult:
        """Put the job in the device queue; a full queue refuses a v1 request (429) but not an
        accepted v2 job, which was promised to run: that one waits for room."""
        while True:
            try:
                return await self.queue.submit(job, progress=self._progress(request_id, seed))
            except Overloaded:
                if not waits:
                    raise
            # The device frees room at the end of each generation (seconds); a short poll is enough.
            await asyncio.sleep(QUEUE_ROOM_POLL_S)

    def _settle_now(self, request_id: str, *, outputs: list[str], seconds: float) -> None:
        try:
            self.ledger.settle(request_id)  # a second time (a retry) is a no-op
        except (ChargeNotFound, ChargeAlreadyFinal):
            # Refunded or gone behind our back: retrying cannot change that, so say it and go on.
            log.error("the charge of %s could not be settled: it is no longer reserved", request_id)
        self.jobs.completed(request_id, outputs=outputs, inference_s=seconds)

    def _progress(self, request_id: str, seed: int) -> Callable[[int, int], None]:
        def on_step(step: int, total: int) -> None:  # runs on the device thread
            # Progress is informational: a database that refuses it must not cost the user the image.
            try:
                if step == 0:
                    self.jobs.started(request_id, seed=seed, total=total)
                else:
                    self.jobs.progress(request_id, step=step, total=total)
            except Exception as exc:
                log.warning("progress of %s not recorded (%s)", request_id, _reason(exc))

        return on_step

    async def _fail(self, request_id: str, error: str) -> Decimal | None:
        """Record the failure and refund; the balance after, or None if the database refused the
        first attempt (the refund is then retried in the background until it lands)."""
        return await asyncio.shield(self._undo(request_id, error))

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
        rate_headers = self.rate_check(key)
        return await self._generate(
            key, self.txt2img_work(key.id, body), rate_headers, surface, keep_outputs, request_id
        )

    async def img2img(
        self,
        key: KeyRecord,
        body: Img2ImgRequest,
        *,
        surface: Surface = "v1",
        keep_outputs: bool = False,
        request_id: str | None = None,
    ) -> Txt2ImgOutcome:
        """`txt2img` for `sd3-med-img2img`: the image is decoded after the rate limit and before the
        price, which follows its size (docs/contract.md, img2img)."""
        rate_headers = self.rate_check(key)
        work = await self.img2img_work(key.id, body)
        return await self._generate(key, work, rate_headers, surface, keep_outputs, request_id)

    async def sd35(
        self,
        key: KeyRecord,
        body: SD35Request,
        *,
        surface: Surface = "v1",
        keep_outputs: bool = False,
        request_id: str | None = None,
    ) -> Txt2ImgOutcome:
        """`txt2img` for an SD3.5 slug, answered in the body's `image_format`."""
        rate_headers = self.rate_check(key)
        work = self.sd35_work(key.id, body)
        return await self._generate(key, work, rate_headers, surface, keep_outputs, request_id)

    async def _generate(
        self,
        key: KeyRecord,
        work: Work,
        rate_headers: dict[str, str],
        surface: Surface,
        keep_outputs: bool,
        request_id: str | None,
    ) -> Txt2ImgOutcome:
        request_id, cost = await self._admit(key.id, work, surface, request_id)
        images, outputs, seed, seconds = await self._run(
            request_id, key.id, work, None, surface=surface, keep_outputs=keep_outputs
        )
        balance = await to_thread.run_sync(lambda: self.ledger.balance(key.id))
        media_type = IMAGE_FORMATS[work.image_format]
        return Txt2ImgOutcome(
            request_id, images, seed, cost, balance, seconds, outputs, rate_headers, media_type
        )

    async def submit(
        self,
        key: KeyRecord,
        body: Txt2ImgRequest | Img2ImgRequest | SD35Request,
        *,
        request_id: str | None = None,
    ) -> Submission:
        """Accept a v2 job: reserve, record it QUEUED, run it in the background.

        Refused at the door (429, nothing charged) when this server already holds
        `max_accepted_jobs` unfinished v2 jobs; once accepted, a job waits for room in the device
        queue instead of failing when it is full.
        """
        rate_headers = self.rate_check(key)
        # Counted with the submissions still in admission: they await the database, and a burst
        # would otherwise all pass this check before the first one is accepted.
        if len(self._background) + self._admitting >= self.settings.queue.max_accepted_jobs:
            raise Overloaded(
                "Too many requests: this server holds as many accepted jobs as it takes, retry later",
                retry_after_s=self.settings.queue.retry_after_s,
            )
        self._admitting += 1
        try:
            if isinstance(body, Img2ImgRequest):
                # A bad image is a 422 here, at the door: never an accepted job that then fails.
                work = await self.img2img_work(key.id, body)
            elif isinstance(body, SD35Request):
                work = self.sd35_work(key.id, body)
            else:
                work = self.txt2img_work(key.id, body)
            request_id, _ = await self._admit(key.id, work, "v2", request_id)
        finally:
            self._admitting -= 1
        self._spawn(request_id, key.id, work.waiting(), None)
        job = await to_thread.run_sync(lambda: self.jobs.get(request_id))
        assert job is not None
        balance = await to_thread.run_sync(lambda: self.ledger.balance(key.id))
        return Submission(job, balance, rate_headers)

    def _spawn(self, request_id: str, key_id: int, work: Work, seed: int | None) -> None:
        async def run() -> None:
            # A failure is already refunded and recorded as FAILED; the client reads it by polling.
            with contextlib.suppress(ApiError):
                await self._run(request_id, key_id, work, seed, surface="v2", keep_outputs=True)

        task = asyncio.create_task(run(), name=f"v2-{request_id}")
        # The event loop keeps only weak references to tasks.
        self._background[task] = request_id
        task.add_done_callback(self._background.pop)

    async def shutdown(self) -> None:
        """Stop: accepted v2 jobs are kept for the next start, the device stops, pending writes land.

        A v2 job was accepted with its credits reserved, and the client is polling for it: stopping
        the server is no reason to fail it. The running one is stopped at its next step and, like
        the waiting ones, put back to QUEUED with its reservation; the next start runs them
        (`recover`), as it does after a crash. v1 requests still waiting are refunded.
        """
        self._stopping = True
        kept = dict(self._background)
        for task in kept:
            task.cancel()
        await asyncio.gather(*kept, return_exceptions=True)
        # Off the event loop: joining the device thread waits for its current step.
        await to_thread.run_sync(self.queue.shutdown)
        try:
            await to_thread.run_sync(self.jobs.requeue, list(kept.values()))
        except Exception as exc:  # they stay QUEUED or PROCESSING: the next start resumes them anyway
            log.warning("v2 jobs not put back to QUEUED (%s); the next start resumes them", _reason(exc))
        await self.writes.drain(SHUTDOWN_DRAIN_S)
