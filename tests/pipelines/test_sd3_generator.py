"""The generator's loop on the tiny model: diffusers parity, the negative window, sizes, failures."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypedDict

import numpy as np
import pytest
import torch

import schedulers
from pipelines.request import GenerationCancelled, GenerationRequest
from pipelines.sd3 import GenerationError, SD3Generator
from schedulers.names import resolve
from schedulers.noise import initial_noise
from schedulers.sigmas import sigmas_for
from server.runtime import Runtime


class Size(TypedDict):
    """GenerationRequest's size keywords."""

    width: int
    height: int
    steps: int


SMALL: Size = {"width": 512, "height": 512, "steps": 10}


@pytest.fixture(scope="module")
def generator(runtime: Runtime) -> SD3Generator:
    assert isinstance(runtime.generator, SD3Generator)
    return runtime.generator


class CallLog:
    """Records every transformer forward: its batch size and which rows had an all-zero context."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.calls: list[tuple[float, int, list[bool]]] = []
        self._handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module: torch.nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        context = kwargs["encoder_hidden_states"]
        zero_rows = [bool((row == 0).all()) for row in context]
        self.calls.append((float(kwargs["timestep"][0]) / 1000.0, context.shape[0], zero_rows))

    def close(self) -> None:
        self._handle.remove()


def test_euler_at_cfg_1_matches_the_stock_diffusers_pipeline(generator: SD3Generator) -> None:
    """Our loop (docs/sampling.md §9) against StableDiffusion3Pipeline + FlowMatchEuler on the same sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    request = GenerationRequest(
        prompt="a cat on a mat", scheduler="Euler", guidance_scale=1.0, seed=11, **SMALL
    )
    ours = generator.generate(request).images[0].astype(np.int16)

    pipe = generator.pipe
    sigmas = sigmas_for(resolve("Euler").schedule, steps=10, shift=3.0)
    stock_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    latents = initial_noise(11, (1, 16, 64, 64))  # σ0 = 1 for sgm_uniform, so x_start = noise
    original = pipe.scheduler
    try:
        pipe.scheduler = stock_scheduler
        theirs = pipe(
            "a cat on a mat",
            negative_prompt="",
            height=512,
            width=512,
            guidance_scale=1.0,
            sigmas=sigmas[:-1].tolist(),
            latents=latents,
            max_sequence_length=77,
            output_type="np",
        ).images[0]
    finally:
        pipe.scheduler = original
    # diffusers rounds to uint8 where ComfyUI (and we) truncate: compare against the truncation.
    truncated = np.floor(theirs * 255.0).astype(np.int16)
    assert np.abs(ours - truncated).max() <= 1


def test_default_negative_window_uses_the_real_negative_on_the_first_three_steps(
    generator: SD3Generator,
) -> None:
    log = CallLog(generator.pipe.transformer)
    try:
        generator.generate(
            GenerationRequest(
                prompt="a dog", negative_prompt="blurry", seed=1, width=512, height=512, steps=25
            )
        )
    finally:
        log.close()
    # DPM++ 2M: one evaluation per step, cond + one uncond each; current rule, shift 3 → 3 real
    # (docs/sampling.md §5.2).
    assert [batch for _, batch, _ in log.calls] == [2] * 25
    uses_zero_negative = [zero_rows[1] for _, _, zero_rows in log.calls]
    assert uses_zero_negative == [False] * 3 + [True] * 22
    assert not any(zero_rows[0] for _, _, zero_rows in log.calls)  # the positive is never zeroed


def test_guidance_1_makes_no_uncond_call(generator: SD3Generator) -> None:
    log = CallLog(generator.pipe.transformer)
    try:
        generator.generate(GenerationRequest(prompt="a dog", guidance_scale=1.0, seed=1, **SMALL))
    finally:
        log.close()
    assert [batch for _, batch, _ in log.calls] == [1] * 10


def test_sample_latents_are_the_latents_that_generate_decodes(generator: SD3Generator) -> None:
    # What a step distillation's teacher pairs hold (pipelines/toy/distill.py): no other path.
    requests = [GenerationRequest(prompt="a dog", seed=seed, **SMALL) for seed in (3, 4)]
    latents = generator.sample_latents(requests)
    assert latents.shape == (2, generator.latent_channels, 64, 64)
    decoded = generator.decode(latents)
    for got, request in zip(decoded, requests, strict=True):
        alone = generator.generate(request).images[0]
        # A batch of two changes float rounding only.
        assert np.abs(got.astype(np.int16) - alone.astype(np.int16)).max() <= 2


def test_sample_latents_refuse_requests_that_cannot_share_a_batch(generator: SD3Generator) -> None:
    first = GenerationRequest(prompt="a dog", seed=3, **SMALL)
    with pytest.raises(ValueError, match="batch key"):
        generator.sample_latents([first, replace(first, steps=12)])


def test_a_trajectory_holds_the_states_at_its_stops_and_stops_on_the_schedule_change_nothing(
    generator: SD3Generator,
) -> None:
    # What a phased distillation's teacher pairs hold (pipelines/toy/distill.py).
    requests = [GenerationRequest(prompt="a dog", seed=seed, **SMALL) for seed in (3, 4)]
    spec = requests[0].sampling_spec()
    # The schedule as the generator builds it (the package-level sigmas_for, which knows the sampler).
    schedule = schedulers.sigmas_for(
        spec.schedule, SMALL["steps"], shift=3.0, denoise=1.0, sampler=spec.sampler
    )
    final = generator.sample_latents(requests)
    on = generator.sample_trajectory(requests, [float(schedule[0]), float(schedule[4]), 0.0])
    assert on.shape == (2, 3, generator.latent_channels, 64, 64)
    noise = torch.cat([initial_noise(seed, (1, generator.latent_channels, 64, 64)) for seed in (3, 4)])
    assert torch.equal(on[:, 0], noise)  # σ0 = 1: the start is the seed's noise itself
    assert torch.equal(on[:, 2], final)  # the stops were the schedule's own: the same run
    # So are σ's a rounding away from the schedule's (as another step count's schedule computes them).
    nudged = [float(torch.nextafter(schedule[k], torch.tensor(2.0))) for k in (3, 6)]
    assert torch.equal(generator.sample_trajectory(requests, [*nudged, 0.0])[:, 2], final)

    # A stop between two of the schedule's σ's is stepped onto. The run is a slightly different
    # discretisation of the same ODE, so it ends near the schedule's own end, not on it.
    between = 0.5 * float(schedule[4] + schedule[5])
    off = generator.sample_trajectory(requests, [between, 0.0])
    assert torch.isfinite(off).all() and not torch.equal(off[:, 1], final)
    assert (off[:, 1] - final).pow(2).mean() < 0.01 * final.pow(2).mean()
    # ...and its state there lies between the schedule's states either side of it.
    around = generator.sample_trajectory(requests, [float(schedule[4]), float(schedule[5])])
    gap = (around[:, 1] - around[:, 0]).pow(2).mean()
    assert (off[:, 0] - around[:, 0]).pow(2).mean() < gap
    assert (off[:, 0] - around[:, 1]).pow(2).mean() < gap


@pytest.mark.parametrize(
    ("scheduler", "stops", "message"),
    [
        ("Heun", [0.5], "once a step"),  # two model calls a step
        ("DPM++ 2M", [1.5], "within the schedule"),
        ("DPM++ 2M", [], "one stop or more"),
    ],
)
def test_a_trajectory_is_refused_where_its_states_would_not_be_the_sampler_s(
    generator: SD3Generator, scheduler: str, stops: list[float], message: str
) -> None:
    request = GenerationRequest(prompt="a dog", seed=3, scheduler=scheduler, **SMALL)
    with pytest.raises(ValueError, match=message):
        generator.sample_trajectory([request], stops)


def test_odd_latent_sizes_are_padded_and_cropped(generator: SD3Generator) -> None:
    # 520 px → 65 latent rows: odd, so padded circularly to 66 for the 2x2 patches, then cropped.
    result = generator.generate(GenerationRequest(prompt="a tree", seed=2, width=512, height=520, steps=10))
    assert result.images[0].shape == (520, 512, 3)
    assert result.images[0].dtype == np.uint8


def test_the_step_callback_sees_every_step_and_can_cancel(generator: SD3Generator) -> None:
    seen: list[tuple[int, int]] = []
    generator.generate(
        GenerationRequest(prompt="a tree", seed=2, **SMALL), callback=lambda i, n: seen.append((i, n))
    )
    assert seen == [(i, 10) for i in range(10)]

    def cancel_at_three(step: int, total: int) -> None:
        if step == 3:
            raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        generator.generate(GenerationRequest(prompt="a tree", seed=2, **SMALL), callback=cancel_at_three)


def test_nan_latents_are_an_error_not_a_black_image(generator: SD3Generator) -> None:
    weight = generator.pipe.transformer.proj_out.bias
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(GenerationError, match="NaN"):
            generator.generate(GenerationRequest(prompt="a tree", seed=2, **SMALL))
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_conditionings_of_different_lengths_are_batched_as_comfyui_does() -> None:
    from pipelines.sd3 import Conditioning, _forward_groups

    def cond(length: int) -> Conditioning:
        return Conditioning(torch.randn(1, length, 8), torch.randn(1, 4))

    same = _forward_groups({"positive": cond(154), "negative": cond(154)})
    assert len(same) == 1
    # lcm(231, 154) = 462 = 3 x 154: repeated along the sequence into one forward.
    (repeated,) = _forward_groups({"positive": cond(231), "negative": cond(154), "zero": cond(154)})
    assert {name: c.context.shape[1] for name, c in repeated.items()} == {
        "positive": 462,
        "negative": 462,
        "zero": 462,
    }
    # lcm(432, 154) is far more than 4 x 154: one forward per length.
    apart = _forward_groups({"positive": cond(432), "negative": cond(154), "zero": cond(154)})
    assert [sorted(group) for group in apart] == [["positive"], ["negative", "zero"]]


def test_a_long_weighted_prompt_generates(generator: SD3Generator) -> None:
    prompt = "(a lighthouse:1.3) on a rocky cliff at dusk, " * 8  # several CLIP chunks, long T5
    log = CallLog(generator.pipe.transformer)
    try:
        result = generator.generate(
            GenerationRequest(prompt=prompt, negative_prompt="blurry", seed=4, **SMALL)
        )
    finally:
        log.close()
    assert result.images[0].shape == (512, 512, 3)
    assert len(log.calls) == 20  # positive and negative differ in length: two forwards per step


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (2048, 512),
        (512, 2040),
        (1000, 512),
        (520, 1016),
        pytest.param(2048, 2048, marks=pytest.mark.slow),  # the largest: ~25 s on 2 cores
    ],
)
def test_every_size_of_the_contract_generates_at_its_size(
    generator: SD3Generator, width: int, height: int
) -> None:
    # Multiples of 8 from 512 to 2048: odd latent sides (1000/8 = 125, 520/8 = 65, 1016/8 = 127,
    # 2040/8 = 255) are padded for the 2x2 patches and cropped back.
    result = generator.generate(
        GenerationRequest(prompt="a field", seed=6, width=width, height=height, steps=10)
    )
    assert result.images[0].shape == (height, width, 3)


@pytest.mark.parametrize(
    ("spelling", "plain"), [("euler_pp", "euler"), ("euler_ancestral_pp", "euler_ancestral")]
)
def test_pp_spellings_are_their_plain_sampler_at_twice_the_guidance(
    generator: SD3Generator, spelling: str, plain: str
) -> None:
    small = GenerationRequest(width=256, height=256, steps=4, seed=5, prompt="a fox")
    doubled = generator.generate(replace(small, scheduler=spelling, guidance_scale=3.5))
    reference = generator.generate(replace(small, scheduler=plain, guidance_scale=7.0))
    assert np.array_equal(doubled.images[0], reference.images[0])


def test_cfg_pp_samplers_evaluate_the_uncond_even_at_guidance_1(generator: SD3Generator) -> None:
    log = CallLog(generator.pipe.transformer)
    try:
        generator.generate(
            GenerationRequest(prompt="a dog", guidance_scale=1.0, seed=1, scheduler="euler_cfg_pp", **SMALL)
        )
    finally:
        log.close()
    assert [batch for _, batch, _ in log.calls] == [2] * 10
