"""The generator's loop on the tiny model: diffusers parity, the negative window, sizes, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.request import GenerationCancelled, GenerationRequest
from pipelines.sd3 import GenerationError, SD3Generator
from schedulers.names import resolve
from schedulers.noise import initial_noise
from schedulers.sigmas import sigmas_for
from server.app import Runtime

SMALL = {"width": 512, "height": 512, "steps": 10}


@pytest.fixture(scope="module")
def generator(runtime: Runtime) -> SD3Generator:
    assert isinstance(runtime.generator, SD3Generator)
    return runtime.generator


class CallLog:
    """Records every transformer forward: its batch size and which rows had an all-zero context."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.calls: list[tuple[float, int, list[bool]]] = []
        self._handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, _args, kwargs):  # type: ignore[no-untyped-def]
        context = kwargs["encoder_hidden_states"]
        zero_rows = [bool((row == 0).all()) for row in context]
        self.calls.append((float(kwargs["timestep"][0]) / 1000.0, context.shape[0], zero_rows))

    def close(self) -> None:
        self._handle.remove()


def test_euler_at_cfg_1_matches_the_stock_diffusers_pipeline(generator: SD3Generator) -> None:
    """Our loop (sampling.md §8) against StableDiffusion3Pipeline + FlowMatchEuler on the same sigmas."""
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
    # DPM++ 2M: one evaluation per step, cond + one uncond each; current rule, shift 3 → 3 real (§4.2).
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
