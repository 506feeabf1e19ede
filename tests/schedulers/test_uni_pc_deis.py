"""UniPC, DEIS and DPM++ SDE beyond the generic trajectory tests: the UniPC formulas at float64 weights,
upstream's float32 quirks, call patterns, and accuracy against the toy's exact ODE solution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from reference import Toy
from test_sampler_trajectories import SDE_FIRST_SIGMA, SHIFT, WINDOW_RANGES, ListNoise, noise_draws
from torch_toy import start_latent, torch_predict

from schedulers import samplers
from schedulers.guidance import guided_denoiser
from schedulers.samplers import run
from schedulers.sigmas import sigmas_for


def torch_vp(sigma: float) -> tuple[float, float, float]:
    alpha, std, lam = samplers._vp_view(sigma)
    return float(alpha), float(std), float(lam)


def run_uni_pc_f64(toy: Toy, *, steps: int, cfg: float, batch: int, schedule: str, bh2: bool) -> None:
    sigmas = sigmas_for(schedule, steps=steps, shift=SHIFT, discard_penultimate=True)
    values = [float(s) for s in sigmas]
    x0 = start_latent(batch, values[0])
    denoiser = guided_denoiser(torch_predict(toy), cfg=cfg, ranges=WINDOW_RANGES)
    ours = samplers._uni_pc(
        denoiser, torch.from_numpy(x0).float(), sigmas, callback=None, bh2=bh2, scalar_dtype=torch.float64
    )
    model = toy.guided(cfg=cfg, ranges=ref.windows(0.1, 1.0, SHIFT, "a", "current"))
    expected = ref.uni_pc(model, x0, values, bh2=bh2, vp=torch_vp)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bh2", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 5.0])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("steps", [2, 3, 4, 25])
def test_uni_pc_formulas_match_the_reference_with_float64_weights(
    toy: Toy, steps: int, cfg: float, batch: int, bh2: bool
) -> None:
    # The production float32 weights carry upstream's own rounding (see TOLERANCE in the trajectory
    # tests); with float64 weights the same formulas agree with the float64 reference to 1e-5.
    run_uni_pc_f64(toy, steps=steps, cfg=cfg, batch=batch, schedule="sgm_uniform", bh2=bh2)


@pytest.mark.parametrize("schedule", ["karras", "beta", "ddim_uniform", "normal", "exponential"])
def test_uni_pc_formulas_on_other_schedules(toy: Toy, schedule: str) -> None:
    run_uni_pc_f64(toy, steps=10, cfg=5.0, batch=2, schedule=schedule, bh2=False)


def test_vp_view_is_upstreams_float32_evaluation() -> None:
    _, std, lam = torch_vp(0.001)
    assert std == 2.0**-10  # not 0.001: 1 − 1/(1+σ²) keeps one significant bit in float32
    assert lam == pytest.approx(math.log(1024), abs=1e-6)
    for sigma in (1.0, 0.5, 0.1):
        a, s, lam = torch_vp(sigma)
        assert a == pytest.approx(1 / math.sqrt(1 + sigma**2), rel=1e-6)
        assert s == pytest.approx(sigma / math.sqrt(1 + sigma**2), rel=1e-4)
        assert lam == pytest.approx(-math.log(sigma), abs=1e-5)


@pytest.mark.parametrize("sampler", ["uni_pc", "uni_pc_bh2", "deis"])
def test_multistep_samplers_evaluate_once_per_step_at_the_schedule_sigmas(toy: Toy, sampler: str) -> None:
    sigmas = sigmas_for("sgm_uniform", steps=7, shift=SHIFT, discard_penultimate=sampler != "deis")
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)
    calls: list[float] = []

    def counting(x: torch.Tensor, sigma: float) -> torch.Tensor:
        calls.append(sigma)
        return denoiser(x, sigma)

    run(sampler, counting, torch.from_numpy(start_latent(1, 1.0)).float(), sigmas)
    assert calls == [float(s) for s in sigmas[:-1]]  # never at UniPC's stand-in end sigma 0.001


def test_dpmpp_sde_evaluates_and_draws_at_the_half_log_snr_midpoint(toy: Toy) -> None:
    sigmas = sigmas_for("sgm_uniform", steps=4, shift=SHIFT)
    values = [SDE_FIRST_SIGMA, *(float(s) for s in sigmas[1:])]
    x = torch.from_numpy(start_latent(1, 1.0)).float()
    noise = ListNoise(noise_draws(8, tuple(x.shape)))
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)
    calls: list[float] = []

    def counting(x: torch.Tensor, sigma: float) -> torch.Tensor:
        calls.append(sigma)
        return denoiser(x, sigma)

    run("dpmpp_sde", counting, x, sigmas, noise=noise, shift=SHIFT)

    def lam(v: float) -> float:
        return math.log((1 - v) / v)

    mids = [
        float(np.float32(1 / (1 + math.exp((lam(a) + lam(b)) / 2))))
        for a, b in zip(values, values[1:-1], strict=False)
    ]
    expected_calls = [v for pair in zip(values[:-2], mids, strict=True) for v in pair] + [values[-2]]
    assert calls == pytest.approx(expected_calls, rel=1e-6)
    expected_draws = [
        p for a, b, m in zip(values, values[1:-1], mids, strict=False) for p in ((a, m), (a, b))
    ]
    flat = [v for pair in noise.calls for v in pair]
    assert flat == pytest.approx([v for pair in expected_draws for v in pair], rel=1e-6)


# --- accuracy against the exact solution --------------------------------------------------------
# For the Gaussian toy at cfg 1 the probability-flow ODE keeps (x − (1−σ)μ)/√((1−σ)²s² + σ²) constant,
# so from σ0 = 1 the exact end point is μ + s·x_start. The numbers below are what upstream's own
# discretisations give; they are upper bounds pinned so a regression shows, not parity targets.
EXACT_ERROR_BOUNDS = {  # max |x − exact| at N = 10 / 25, sgm_uniform; measured ×1.2
    # measured: euler 0.478 / 0.200, dpm_2 0.523 / 0.119, uni_pc 0.518 / 0.105, deis 0.193 / 0.031.
    # UniPC's large error is its schedule: the discarded penultimate sigma leaves one long final
    # interval, taken at first order (lower_order_final), as for dpm_2.
    "euler": (0.58, 0.24),
    "dpm_2": (0.63, 0.15),
    "uni_pc": (0.63, 0.13),
    "uni_pc_bh2": (0.63, 0.14),
    "deis": (0.24, 0.04),
}


def exact_end(toy: Toy, x_start: np.ndarray) -> np.ndarray:
    shape = (1, -1, 1, 1)
    return toy.means["positive"].reshape(shape) + toy.scale.reshape(shape) * x_start


@pytest.mark.parametrize("sampler", sorted(EXACT_ERROR_BOUNDS))
def test_error_against_the_exact_ode_solution(toy: Toy, sampler: str) -> None:
    x0 = start_latent(3, 1.0)
    denoiser = guided_denoiser(torch_predict(toy), cfg=1.0, ranges=())
    errors = []
    for steps in (10, 25):
        sigmas = sigmas_for(
            "sgm_uniform",
            steps=steps,
            shift=SHIFT,
            discard_penultimate=sampler in samplers.DISCARD_PENULTIMATE,
        )
        out = run(sampler, denoiser, torch.from_numpy(x0).float(), sigmas).numpy()
        errors.append(float(np.abs(out - exact_end(toy, x0)).max()))
    assert errors[1] < errors[0]
    assert errors[0] < EXACT_ERROR_BOUNDS[sampler][0] and errors[1] < EXACT_ERROR_BOUNDS[sampler][1], errors
