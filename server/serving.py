"""The one sequence every public surface shares: price → reserve → queue → settle or refund → encode.

Routes call `Serving.txt2img` and only shape its answer. Credits are reserved (debited) before
any device work, with one atomic conditional update, and given back if anything after that
fails, so a request is charged exactly when it returns images.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

from anyio import to_thread

from pipelines.request import GenerationRequest
from server.config import Settings
from server.encoding import to_jpeg
from server.errors import ApiError, GenerationFailed, RateLimited
from server.headers import REMAINING_CREDITS, format_credits
from server.ledger import KeyRecord, Ledger
from server.pricing import price_of
from server.queue import WorkQueue
from server.rate_limit import RateLimiter
from server.schemas import MAX_SEED, Txt2ImgRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Txt2ImgOutcome:
    request_id: str
    jpegs: list[bytes]
    seed: int
    cost: Decimal
    balance: Decimal
    seconds: float


def to_generation_request(body: Txt2ImgRequest, *, seed: int) -> GenerationRequest:
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
    )


def resolve_seed(seed: int) -> int:
    # -1 means "random": draw one in the API's own range so that it can be sent back and replayed.
    return secrets.randbelow(MAX_SEED + 1) if seed < 0 else seed


class Serving:
    def __init__(self, *, settings: Settings, ledger: Ledger, queue: WorkQueue) -> None:
        self.settings = settings
        self.ledger = ledger
        self.queue = queue
        self.rate_limiter = RateLimiter(settings.limits.requests_per_minute)
        self.owner = settings.resolved_instance_id

    def recover(self) -> list[str]:
        """Refund what this instance left reserved when it last stopped (crash, kill -9)."""
        refunded = self.ledger.refund_abandoned(self.owner)
        if refunded:
            log.warning("refunded %d reservation(s) left open by a previous run", len(refunded))
        return refunded

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
        )

    async def txt2img(self, key: KeyRecord, body: Txt2ImgRequest) -> Txt2ImgOutcome:
        request_id = str(uuid.uuid4())
        cost = self.price(body)
        # Raises InsufficientCredits (406) with nothing written if the balance does not cover it.
        await to_thread.run_sync(
            lambda: self.ledger.reserve(key_id=key.id, amount=cost, request_id=request_id, owner=self.owner)
        )
        seed = resolve_seed(body.seed)
        job = to_generation_request(body, seed=seed)
        started = time.perf_counter()
        try:
            result = await self.queue.submit(job)
            quality = self.settings.performance.jpeg_quality
            jpegs = await to_thread.run_sync(
                lambda: [to_jpeg(image, quality=quality) for image in result.images]
            )
        except ApiError as exc:  # e.g. the queue is full (429): nothing ran, the debit goes back
            balance = await to_thread.run_sync(lambda: self.ledger.refund(request_id))
            exc.headers[REMAINING_CREDITS] = format_credits(balance)
            raise
        except Exception as exc:  # a failure on the device: refund, and no traceback to the client
            balance = await to_thread.run_sync(lambda: self.ledger.refund(request_id))
            log.exception("generation %s failed", request_id)
            raise GenerationFailed(headers={REMAINING_CREDITS: format_credits(balance)}) from exc
        except BaseException:
            # The waiting task was cancelled (client gone, shutdown): no await is safe any more,
            # and the refund is one short transaction, so it runs right here.
            self.ledger.refund(request_id)
            raise
        seconds = time.perf_counter() - started
        await to_thread.run_sync(lambda: self.ledger.settle(request_id))
        balance = await to_thread.run_sync(lambda: self.ledger.balance(key.id))
        return Txt2ImgOutcome(request_id, jpegs, seed, cost, balance, seconds)
