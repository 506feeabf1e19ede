from decimal import Decimal
from functools import partial
from typing import TypedDict, Unpack

import pytest
import torch

from schedulers import ADAPTIVE, sample, sigmas_for
from schedulers.names import public_names, resolve
from server.config import PricingSettings
from server.pricing import img2img_price, model_evaluations, price_of, sd35_price


class Size(TypedDict):
    width: int
    height: int
    steps: int
    samples: int


class Request(Size, total=False):
    """price_of's request keywords: the sizes, and the sampling when a test names it."""

    scheduler: str
    shift: float
    denoise: float
    guidance_scale: float


class Overrides(TypedDict, total=False):
    """Whichever of a Request's keywords a test changes."""

    width: int
    height: int
    steps: int
    samples: int
    scheduler: str
    shift: float
    denoise: float
    guidance_scale: float


DEFAULTS: Size = {"width": 1024, "height": 1024, "steps": 25, "samples": 1}


def price(**overrides: Unpack[Overrides]) -> Decimal:
    request: Request = {**DEFAULTS, **overrides}
    return price_of(**request, pricing=PricingSettings())


def test_defaults_cost_the_listed_price_per_image() -> None:
    assert price() == Decimal("0.039")


def test_price_scales_with_samples() -> None:
    assert price(samples=4) == Decimal("0.156")


def test_price_scales_with_pixels() -> None:
    assert price(width=512, height=512) == Decimal("0.00975")


def test_price_scales_with_steps() -> None:
    assert price(steps=50) == Decimal("0.078")
    assert price(steps=10) == Decimal("0.0156")


def test_largest_request_is_priced_exactly() -> None:
    assert price(width=2048, height=2048, steps=100, samples=4) == Decimal("2.496")


def test_price_has_six_decimals_rounded_half_up() -> None:
    # 0.039 × 11/25 × (520 × 512 / 1024²) = 0.00435703125 → down.
    assert price(steps=11, width=520, height=512) == Decimal("0.004357")
    # 0.039 × 11/25 × (648 × 512 / 1024²) = 0.00542953125 → up.
    assert price(steps=11, width=648, height=512) == Decimal("0.005430")
    # 0.039 × 24/25 × (520 × 1024 / 1024²) = 0.0190125 exactly: a tie, which rounds up.
    assert price(steps=24, width=520) == Decimal("0.019013")
    # 0.000001 × 1/2 = 0.0000005 exactly: a tie, which rounds up.
    tie = PricingSettings(price_per_image=Decimal("0.000001"), reference_steps=2, reference_pixels=1)
    assert price_of(width=1, height=1, steps=1, samples=1, pricing=tie) == Decimal("0.000001")
    # 0.000001 × 1/3 = 0.00000033… rounds down to zero.
    third = PricingSettings(price_per_image=Decimal("0.000001"), reference_steps=3, reference_pixels=1)
    assert price_of(width=1, height=1, steps=1, samples=1, pricing=third) == Decimal("0")


def test_price_is_quantized_to_six_decimals() -> None:
    assert price().as_tuple().exponent == -6


def test_price_follows_the_pricing_settings() -> None:
    pricing = PricingSettings(price_per_image=Decimal("0.05"))
    assert price_of(**DEFAULTS, pricing=pricing) == Decimal("0.05")


ZEROED: list[Overrides] = [{"width": 0}, {"height": 0}, {"steps": 0}, {"samples": 0}]


@pytest.mark.parametrize("zeroed", ZEROED, ids=lambda zeroed: next(iter(zeroed)))
def test_non_positive_dimensions_are_refused(zeroed: Overrides) -> None:
    (field,) = zeroed
    with pytest.raises(ValueError, match=field):
        price(**zeroed)


# -- pricing by model evaluations ------------------------------------------------------------------
EVALUATIONS = PricingSettings(mode="evaluations")


def evaluations_price(**overrides: Unpack[Overrides]) -> Decimal:
    request: Request = {**DEFAULTS, **overrides}
    return price_of(**request, pricing=EVALUATIONS)


def test_by_evaluations_the_default_request_still_costs_the_listed_price() -> None:
    assert evaluations_price() == price() == Decimal("0.039")
    assert evaluations_price(scheduler="Euler", steps=50) == price(steps=50)


@pytest.mark.parametrize("scheduler", ["Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "dpmpp_sde"])
def test_by_evaluations_a_two_stage_sampler_costs_what_it_runs(scheduler: str) -> None:
    # 2 × 25 − 1 = 49 evaluations against the reference's 25.
    assert evaluations_price(scheduler=scheduler) == Decimal("0.07644")
    assert price(scheduler=scheduler) == Decimal("0.039")  # the default mode ignores the sampler


def test_by_evaluations_guidance_one_skips_the_negative_and_costs_half() -> None:
    assert evaluations_price(guidance_scale=1.0) == Decimal("0.0195")
    assert price(guidance_scale=1.0) == Decimal("0.039")


# An adaptive sampler's count depends on the model: test_an_adaptive_sampler_is_priced_as_documented.
@pytest.mark.parametrize("name", [name for name in public_names() if resolve(name).sampler not in ADAPTIVE])
@pytest.mark.parametrize(("steps", "shift", "denoise"), [(10, 3.0, 1.0), (11, 3.0, 1.0), (13, 1.0, 0.35)])
def test_model_evaluations_match_the_denoiser_calls_each_scheduler_makes(
    name: str, steps: int, shift: float, denoise: float
) -> None:
    spec = resolve(name)
    calls = 0

    def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return 0.9 * x

    sigmas = sigmas_for(spec.schedule, steps, shift=shift, denoise=denoise, sampler=spec.sampler)
    sample(spec.sampler, denoiser, sigmas[0] * torch.ones(1, 4, 2, 2), sigmas, seed=0, shift=shift)
    evaluations = partial(model_evaluations, scheduler=name, steps=steps, shift=shift, denoise=denoise)
    assert evaluations(guidance_scale=1.0) == calls
    assert evaluations(guidance_scale=5.0) == 2 * calls


def test_an_adaptive_sampler_is_priced_as_documented() -> None:
    # Three evaluations for each of the 25 steps, and the negative: 150 against the reference's 50.
    assert evaluations_price(scheduler="dpm_adaptive") == Decimal("0.117")


def test_each_sd35_slug_has_its_own_rate_by_images_steps_and_pixels() -> None:
    pricing = PricingSettings()

    def sd35(
        slug: str, *, width: int = 1024, height: int = 1024, steps: int = 25, images: int = 1
    ) -> Decimal:
        return sd35_price(slug=slug, pricing=pricing, width=width, height=height, steps=steps, images=images)

    assert sd35("stable-diffusion-3.5-large-txt2img") == Decimal("0.014")  # the hosted page's figure
    assert sd35("stable-diffusion-3.5-turbo-txt2img", steps=4) == Decimal("0.00224")  # Large's rate per step
    assert sd35("stable-diffusion-3.5-medium-txt2img", steps=40) == Decimal("0.0624")
    assert sd35("stable-diffusion-3.5-large-txt2img", images=2, width=512, height=512) == Decimal("0.007")
    own = pricing.model_copy(
        update={"sd35_turbo_price_per_image": Decimal("0.004"), "sd35_turbo_reference_steps": 4}
    )
    assert sd35_price(
        slug="stable-diffusion-3.5-turbo-txt2img", width=1024, height=1024, steps=4, images=1, pricing=own
    ) == Decimal("0.004")
    # The evaluations mode prices every slug by its work: the reference request costs the same,
    # a two-stage sampler about twice as much, and Turbo's guidance 1 (no negative) half.
    evaluations = pricing.model_copy(update={"mode": "evaluations"})

    def work(slug: str, *, sampler: str = "euler", guidance_scale: float = 5.0) -> Decimal:
        return sd35_price(
            slug=slug,
            pricing=evaluations,
            width=1024,
            height=1024,
            steps=25,
            images=1,
            sampler=sampler,
            guidance_scale=guidance_scale,
        )

    large = "stable-diffusion-3.5-large-txt2img"
    assert work(large) == Decimal("0.014")
    # The page names its schedule apart from the sampler: ddim_uniform at 30 steps runs 31.
    at_30 = partial(sd35_price, slug=large, pricing=evaluations, width=1024, height=1024, steps=30, images=1)
    assert at_30(schedule="sgm_uniform") == Decimal("0.0168")
    assert at_30(schedule="ddim_uniform") == Decimal("0.01736")
    assert work(large, sampler="heun") > Decimal("0.027")
    assert work(large, guidance_scale=1.0) == Decimal("0.007")


def test_img2img_follows_the_pricing_mode_and_by_evaluations_the_steps_its_strength_runs() -> None:
    pricing = PricingSettings()
    evaluations = pricing.model_copy(update={"mode": "evaluations"})
    size = partial(img2img_price, width=1024, height=1024, steps=20, samples=1)
    assert size(pricing=pricing) == Decimal("0.008")
    assert size(pricing=pricing, sampler="heun") == Decimal("0.008")  # the hosted price
    assert size(pricing=evaluations) == Decimal("0.008")
    assert size(pricing=evaluations, sampler="heun") > Decimal("0.015")
    assert size(pricing=evaluations, guidance_scale=1.0) == Decimal("0.004")
    # Priced per image, strength changes nothing. By evaluations: ddim_uniform at 30 steps runs 31 at
    # full strength and 30 below it; strength 0 runs none and is priced as strength 1, never free.
    ddim = partial(img2img_price, width=1024, height=1024, steps=30, samples=1, schedule="ddim_uniform")
    assert {ddim(pricing=pricing, strength=s) for s in (0.0, 0.3, 1.0)} == {Decimal("0.012")}
    assert ddim(pricing=evaluations, strength=1.0) == Decimal("0.0124")
    assert ddim(pricing=evaluations, strength=0.3) == Decimal("0.012")
    assert ddim(pricing=evaluations, strength=0.0) == Decimal("0.0124")
