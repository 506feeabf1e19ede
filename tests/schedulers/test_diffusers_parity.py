"""Pins where stock diffusers schedulers equal our ComfyUI math and where not (docs/sampling.md §11)."""

from __future__ import annotations

import pytest
import torch
from reference import Toy
from torch_toy import start_latent, torch_predict

from schedulers.guidance import guided_denoiser, negative_ranges
from schedulers.noise import AncestralNoise
from schedulers.samplers import (
    noise_for,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from schedulers.sigmas import percent_to_sigma, sigmas_for, to_float32
from schedulers.stepping import Denoiser

diffusers = pytest.importorskip("diffusers")


def toy_denoiser(toy: Toy) -> Denoiser:
    ranges = negative_ranges(start=0.1, stop=1.0, shift=3.0, wiring="a", rule="current")
    return guided_denoiser(torch_predict(toy), cfg=5.0, ranges=ranges)


def velocity(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x - denoiser(x, sigma)) / sigma


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_flow_match_euler_default_timesteps_are_our_normal_schedule(steps: int) -> None:
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(
        scheduler.sigmas.float(), sigmas_for("normal", steps=steps, shift=3.0), atol=2e-7, rtol=0
    )


@pytest.mark.parametrize("schedule", ["sgm_uniform", "karras"])
def test_flow_match_euler_with_our_sigmas_is_our_euler(toy: Toy, schedule: str) -> None:
    sigmas = sigmas_for(schedule, steps=25, shift=3.0)
    denoiser = toy_denoiser(toy)
    x = torch.from_numpy(start_latent(2, float(sigmas[0]))).float()
    ours = sample_euler(denoiser, x, sigmas)

    # shift=1 so the scheduler does not shift our already shifted sigmas a second time.
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].tolist())
    torch.testing.assert_close(scheduler.sigmas.float(), sigmas, atol=0, rtol=0)
    theirs = x
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(denoiser, theirs, float(sigmas[i]))
        theirs = scheduler.step(v, t, theirs, return_dict=False)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)  # bit-identical in practice


def test_flow_match_heun_is_our_heun_on_the_normal_schedule(toy: Toy) -> None:
    steps = 10
    sigmas = sigmas_for("normal", steps=steps, shift=3.0)
    denoiser = toy_denoiser(toy)
    x = torch.from_numpy(start_latent(2, 1.0)).float()
    ours = sample_heun(denoiser, x, sigmas)

    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    theirs = x
    for t in scheduler.timesteps:
        index = 0 if scheduler.step_index is None else scheduler.step_index
        v = velocity(denoiser, theirs, float(scheduler.sigmas[index]))
        theirs = scheduler.step(v, t, theirs, return_dict=False)[0]
    # diffusers builds its own (1e-7-close) sigmas and orders the float32 ops differently.
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_dpm_solver_multistep_flow_is_not_our_dpmpp_2m(toy: Toy) -> None:
    """diffusers' DPM++ 2M uses the logit-SNR λ; ComfyUI's uses −log σ, so it is not a drop-in."""
    steps = 25
    sigmas = sigmas_for("sgm_uniform", steps=steps, shift=3.0)
    denoiser = toy_denoiser(toy)
    x = torch.from_numpy(start_latent(2, 1.0)).float()
    ours = sample_dpmpp_2m(denoiser, x, sigmas)

    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )
    scheduler.set_timesteps(steps)
    # Force our sigmas in so only the update formula differs.
    scheduler.sigmas = sigmas.clone()
    scheduler.timesteps = sigmas[:-1] * 1000
    theirs = x
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(denoiser, theirs, float(sigmas[i]))
        theirs = scheduler.step(v, t, theirs, return_dict=False)[0]
    assert torch.isfinite(theirs).all()
    assert (theirs - ours).abs().max().item() > 1e-3


def test_ltx_euler_ancestral_rf_with_the_same_generator_is_our_euler_ancestral(toy: Toy) -> None:
    seed = 1234
    sigmas = sigmas_for("sgm_uniform", steps=20, shift=3.0)
    denoiser = toy_denoiser(toy)
    x = torch.from_numpy(start_latent(2, 1.0)).float()
    ours = sample_euler_ancestral(denoiser, x, sigmas, noise=AncestralNoise(seed))

    scheduler = diffusers.LTXEulerAncestralRFScheduler()
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    # On CPU our ancestral stream is Generator(seed + 1), drawn once per noisy step, as diffusers draws.
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    theirs = x
    for i, t in enumerate(scheduler.timesteps[: len(sigmas) - 1]):
        v = velocity(denoiser, theirs, float(scheduler.sigmas[i]))
        theirs = scheduler.step(v, t, theirs, generator=generator, return_dict=False)[0]
    torch.testing.assert_close(theirs, ours, atol=5e-6, rtol=0)


def test_dpm_solver_sde_flow_with_our_sigmas_and_noise_is_our_dpmpp_2m_sde(toy: Toy) -> None:
    steps, shift = 20, 3.0
    sigmas = sigmas_for("sgm_uniform", steps=steps, shift=shift)
    denoiser = toy_denoiser(toy)
    x = torch.from_numpy(start_latent(2, 1.0)).float()
    brownian = noise_for("dpmpp_2m_sde", seed=99, sigmas=sigmas, like=x)
    assert brownian is not None
    drawn: list[torch.Tensor] = []

    def recording(sigma: float, sigma_next: float, like: torch.Tensor) -> torch.Tensor:
        drawn.append(brownian(sigma, sigma_next, like))
        return drawn[-1]

    ours = sample_dpmpp_2m_sde(denoiser, x, sigmas, noise=recording, shift=shift)

    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
    )
    scheduler.set_timesteps(steps)
    forced = sigmas.clone()
    forced[0] = to_float32(percent_to_sigma(1e-4, shift=shift, rule="current"))  # the first-sigma offset
    scheduler.sigmas = forced
    scheduler.timesteps = forced[:-1] * 1000
    theirs = x
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(denoiser, theirs, float(forced[i]))
        variance = drawn[i] if i < len(drawn) else torch.zeros_like(x)
        theirs = scheduler.step(v, t, theirs, variance_noise=variance, return_dict=False)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)
