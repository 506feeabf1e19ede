"""The price of a generation request, in credits (docs/contract.md §4).

price = price_per_image × samples × (steps / reference_steps) × (width × height / reference_pixels),
rounded half-up to 6 decimals — the resolution of the ledger (1 credit = 1 000 000 micro-credits).

With `pricing.mode = "evaluations"` the operator prices the work instead: steps / reference_steps
becomes evaluations / reference_evaluations, where evaluations are the transformer forwards per
image (`model_evaluations`) and the reference is `reference_steps` of a one-evaluation sampler with
guidance — so the default request costs the same in both modes (docs/reliability.md, Request bounds).
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

from pipelines.request import GenerationRequest
from schedulers import denoiser_calls
from server.config import PricingSettings
from server.schemas import SD35_LARGE_SLUG, SD35_MEDIUM_SLUG, SD35_TURBO_SLUG

PRICE_DECIMALS = 6

# An adaptive sampler's count depends on the image; it is priced as a third-order solver over the
# requested steps (three evaluations a step), an estimate documented in docs/reliability.md.
ADAPTIVE_CALLS_PER_STEP = 3

# Forwards per evaluation with classifier-free guidance: the prompt and a negative. At guidance 1 the
# negative is skipped (schedulers/guidance.py), so one.
GUIDED_FORWARDS = 2


def model_evaluations(
    *,
    scheduler: str,
    steps: int,
    shift: float = 3.0,
    denoise: float = 1.0,
    guidance_scale: float,
    schedule: str | None = None,
) -> int:
    """Transformer forwards per image of a request: denoiser calls × (1 at guidance 1, else 2).

    `schedule` is the sigma schedule of a page that names it apart from the sampler (img2img, SD3.5),
    as `GenerationRequest.schedule` is."""
    job = GenerationRequest(
        prompt="", scheduler=scheduler, schedule=schedule, steps=steps, shift=shift, denoise=denoise
    )
    spec = job.sampling_spec()
    # The sigmas the generator runs: the schedule itself says how many steps that is (ddim_uniform runs
    # a few more than asked for some steps, shifts and denoise values, as ComfyUI's does).
    sigmas = job.sigmas()
    counted = denoiser_calls(spec.sampler, tuple(float(sigma) for sigma in sigmas))
    calls = ADAPTIVE_CALLS_PER_STEP * (len(sigmas) - 1) if counted is None else counted
    # The same test as the guided denoiser's, so the price follows what runs.
    return calls * (1 if math.isclose(guidance_scale, 1.0) else GUIDED_FORWARDS)


def price_of(
    *,
    width: int,
    height: int,
    steps: int,
    samples: int,
    pricing: PricingSettings,
    scheduler: str = "DPM++ 2M",
    shift: float = 3.0,
    denoise: float = 1.0,
    guidance_scale: float = 5.0,
    schedule: str | None = None,
) -> Decimal:
    for field, value in (("width", width), ("height", height), ("steps", steps), ("samples", samples)):
        if value < 1:
            raise ValueError(f"{field} must be at least 1, got {value}")
    if pricing.reference_steps < 1 or pricing.reference_pixels < 1:
        raise ValueError("pricing.reference_steps and pricing.reference_pixels must be at least 1")
    if not pricing.price_per_image.is_finite() or pricing.price_per_image < 0:
        raise ValueError(f"pricing.price_per_image must be non-negative, got {pricing.price_per_image}")

    if pricing.mode == "evaluations":
        work = Fraction(
            model_evaluations(
                scheduler=scheduler,
                steps=steps,
                shift=shift,
                denoise=denoise,
                guidance_scale=guidance_scale,
                schedule=schedule,
            ),
            GUIDED_FORWARDS * pricing.reference_steps,
        )
    else:
        work = Fraction(steps, pricing.reference_steps)
    # A Fraction keeps every step exact: Decimal division would round at the context precision first
    # and could then round a second time, which is how one micro-credit goes astray.
    exact = Fraction(pricing.price_per_image) * samples * work * width * height / pricing.reference_pixels
    scaled = exact * 10**PRICE_DECIMALS
    # The value is non-negative, so floor(x + 1/2) is exactly ROUND_HALF_UP.
    units = int(scaled + Fraction(1, 2))
    return Decimal(units).scaleb(-PRICE_DECIMALS)


def img2img_price(
    *,
    width: int,
    height: int,
    steps: int,
    samples: int,
    pricing: PricingSettings,
    sampler: str = "dpmpp_2m",
    schedule: str = "sgm_uniform",
    guidance_scale: float = 5.0,
    strength: float = 1.0,
) -> Decimal:
    """`sd3-med-img2img`'s price: its own rate per image and steps, scaled by the output (cropped input)
    size as txt2img's is (docs/contract.md, img2img). Strength barely changes the work, since the model
    runs `steps` times at any strength above 0, but priced by evaluations the count is the strength's own
    schedule: ddim_uniform runs one step more than asked only at full strength. Strength 0 runs no step
    and is priced as strength 1, so that no request is free."""
    own = pricing.model_copy(
        update={
            "price_per_image": pricing.img2img_price_per_image,
            "reference_steps": pricing.img2img_reference_steps,
        }
    )
    return price_of(
        width=width,
        height=height,
        steps=steps,
        samples=samples,
        pricing=own,
        scheduler=sampler,
        schedule=schedule,
        denoise=strength if strength > 0 else 1.0,
        guidance_scale=guidance_scale,
    )


def sd35_price(
    *,
    slug: str,
    width: int,
    height: int,
    steps: int,
    images: int,
    pricing: PricingSettings,
    sampler: str = "euler",
    schedule: str = "sgm_uniform",
    guidance_scale: float = 5.0,
) -> Decimal:
    """An SD3.5 slug's price: its own rate per image and reference steps, scaled by `images`
    (`batch_size`) and the output size (docs/contract.md §8)."""
    rates = {
        SD35_LARGE_SLUG: (pricing.sd35_large_price_per_image, pricing.sd35_large_reference_steps),
        SD35_TURBO_SLUG: (pricing.sd35_turbo_price_per_image, pricing.sd35_turbo_reference_steps),
        SD35_MEDIUM_SLUG: (pricing.sd35_medium_price_per_image, pricing.sd35_medium_reference_steps),
    }
    price_per_image, reference_steps = rates[slug]
    own = pricing.model_copy(update={"price_per_image": price_per_image, "reference_steps": reference_steps})
    return price_of(
        width=width,
        height=height,
        steps=steps,
        samples=images,
        pricing=own,
        scheduler=sampler,
        schedule=schedule,
        guidance_scale=guidance_scale,
    )
