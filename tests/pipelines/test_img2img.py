"""img2img on the tiny model: the crop, the truncated sigmas, the start latent, the VAE round trip."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypedDict, Unpack

import numpy as np
import pytest
import torch

from pipelines.img2img import crop_to_grid, cropped_size
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from schedulers import sigmas_for
from schedulers.noise import initial_noise
from server.runtime import Runtime


@pytest.fixture(scope="module")
def generator(runtime: Runtime) -> SD3Generator:
    assert isinstance(runtime.generator, SD3Generator)
    return runtime.generator


def gradient_image(width: int, height: int) -> np.ndarray:
    """A smooth RGB image with distinct rows and columns, so a wrong crop offset shows."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], -1
    ).astype(np.uint8)


class Fields(TypedDict, total=False):
    """The GenerationRequest fields that a test here sets."""

    prompt: str
    steps: int
    seed: int
    samples: int
    denoise: float
    guidance_scale: float
    schedule: str


def img2img(image: np.ndarray, **fields: Unpack[Fields]) -> GenerationRequest:
    width, height = cropped_size(image.shape[1], image.shape[0])
    request = GenerationRequest(
        prompt="a red barn", scheduler="euler", steps=4, seed=7, init_image=image, width=width, height=height
    )
    return replace(request, **fields)


class Forwards:
    """Every transformer forward's hidden states and sigma."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.inputs: list[tuple[float, torch.Tensor]] = []
        self._handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module: torch.nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.inputs.append((float(kwargs["timestep"][0]) / 1000.0, kwargs["hidden_states"].float().clone()))

    def close(self) -> None:
        self._handle.remove()


# -- the sigmas (docs/sampling.md, img2img: the figures ComfyUI gives for the page's defaults) -------------


@pytest.mark.parametrize(
    ("schedule", "strength", "first", "second"),
    [
        ("sgm_uniform", 0.7, 0.8828, 0.8642),
        ("simple", 0.7, 0.8827, None),
        ("normal", 0.7, 0.8774, None),
        ("sgm_uniform", 0.5, 0.7511, None),
    ],
)
def test_strength_keeps_the_last_steps_of_a_longer_schedule(
    schedule: str, strength: float, first: float, second: float | None
) -> None:
    sigmas = sigmas_for(schedule, 20, shift=3.0, denoise=strength, sampler="dpmpp_2m")
    assert len(sigmas) == 21  # 20 model steps whatever the strength
    longer = sigmas_for(schedule, int(20 / strength), shift=3.0, sampler="dpmpp_2m")
    assert len(longer) == (29 if strength == 0.7 else 41)  # N′ = int(20 / 0.7) = 28 steps
    assert torch.equal(sigmas, longer[-21:])
    assert round(float(sigmas[0]), 4) == first
    if second is not None:
        assert round(float(sigmas[1]), 4) == second
    assert float(sigmas[0]) > strength  # the shift makes σ0 exceed the strength


# -- the crop --------------------------------------------------------------------------------------------


def test_crop_keeps_the_centre_with_the_odd_pixel_on_the_far_side() -> None:
    image = gradient_image(70, 67)  # 70 = 64 + 6 → 3 off the left; 67 = 64 + 3 → 1 off the top
    cropped = crop_to_grid(image)
    assert cropped.shape == (64, 64, 3)
    assert cropped_size(70, 67) == (64, 64)
    np.testing.assert_array_equal(cropped, image[1:65, 3:67])
    assert crop_to_grid(gradient_image(64, 72)).shape == (72, 64, 3)  # already on the grid: unchanged


# -- the generator ---------------------------------------------------------------------------------------


def test_strength_zero_returns_the_vae_round_trip(generator: SD3Generator) -> None:
    image = gradient_image(75, 68)
    forwards = Forwards(generator.pipe.transformer)
    try:
        out = generator.generate(img2img(image, denoise=0.0)).images[0]
    finally:
        forwards.close()
    assert forwards.inputs == []  # no sampling at all
    assert out.shape == (64, 72, 3)

    # Expected, straight from diffusers: the cropped pixels' posterior mode, decoded.
    vae = generator.pipe.vae
    pixels = torch.from_numpy(image[2:66, 1:73].astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        mode = vae.encode(pixels * 2 - 1).latent_dist.mode()
        decoded = vae.decode(mode, return_dict=False)[0]
    expected = (255.0 * ((decoded[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0)).to(torch.uint8).numpy()
    assert np.abs(out.astype(np.int16) - expected.astype(np.int16)).max() <= 1


def test_the_model_runs_steps_times_from_the_noised_image_latent(generator: SD3Generator) -> None:
    image = gradient_image(64, 64)
    request = img2img(image, denoise=0.7, steps=4, guidance_scale=1.0, samples=2, seed=1234)
    forwards = Forwards(generator.pipe.transformer)
    try:
        result = generator.generate(request)
    finally:
        forwards.close()
    assert len(result.images) == 2 and result.images[0].shape == (64, 64, 3)
    assert len(forwards.inputs) == 4  # `steps` forwards (guidance 1: no negative pass)

    sigmas = sigmas_for("sgm_uniform", 4, shift=3.0, denoise=0.7, sampler="euler")
    assert len(sigmas) == 5
    first_sigma, first_input = forwards.inputs[0]
    assert first_sigma == pytest.approx(float(sigmas[0]), abs=1e-6)
    # x0 = σ0·noise + (1 − σ0)·latent, one randn(seed) over both samples, the latent repeated.
    with torch.inference_mode():
        latent = generator.encode_image(image)
    noise = initial_noise(1234, (2, *latent.shape[1:]))
    sigma0 = float(sigmas[0])
    expected = sigma0 * noise + (1 - sigma0) * latent.repeat(2, 1, 1, 1)
    torch.testing.assert_close(first_input, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(first_input[0], first_input[1])  # one draw for the batch, not the seed twice


def test_full_strength_starts_from_the_full_schedule_and_is_reproducible(generator: SD3Generator) -> None:
    image = gradient_image(64, 64)
    forwards = Forwards(generator.pipe.transformer)
    try:
        first = generator.generate(img2img(image, denoise=1.0, guidance_scale=1.0)).images[0]
    finally:
        forwards.close()
    assert forwards.inputs[0][0] == pytest.approx(1.0)
    again = generator.generate(img2img(image, denoise=1.0, guidance_scale=1.0)).images[0]
    np.testing.assert_array_equal(first, again)


def test_the_schedule_can_be_named_apart_from_the_sampler(generator: SD3Generator) -> None:
    image = gradient_image(64, 64)
    forwards = Forwards(generator.pipe.transformer)
    try:
        generator.generate(img2img(image, denoise=0.7, guidance_scale=1.0, schedule="normal"))
    finally:
        forwards.close()
    expected = sigmas_for("normal", 4, shift=3.0, denoise=0.7, sampler="euler")
    assert [s for s, _ in forwards.inputs] == pytest.approx([float(s) for s in expected[:-1]], abs=1e-6)


def test_a_size_that_is_not_the_cropped_size_is_refused(generator: SD3Generator) -> None:
    image = gradient_image(64, 64)
    request = GenerationRequest(prompt="x", init_image=image, width=72, height=64, steps=2, denoise=0.5)
    with pytest.raises(ValueError, match="cropped size"):
        generator.generate(request)


def test_img2img_requests_batch_together_each_with_its_own_image(generator: SD3Generator) -> None:
    from pipelines.sd3 import batch_key

    first = img2img(gradient_image(64, 64), denoise=0.6, seed=1)
    second = img2img(gradient_image(64, 64)[::-1].copy(), denoise=0.6, seed=2, prompt="a blue boat")
    txt2img = GenerationRequest(
        prompt="a red barn", scheduler="euler", steps=4, seed=7, width=64, height=64, denoise=0.6
    )
    assert batch_key(first) == batch_key(second) != batch_key(txt2img)
    together = generator.generate_batch([first, second])
    alone = [generator.generate(first), generator.generate(second)]
    for batched, single in zip(together, alone, strict=True):
        assert np.abs(batched.images[0].astype(np.int16) - single.images[0].astype(np.int16)).max() <= 2
    assert not np.array_equal(together[0].images[0], together[1].images[0])
