"""The guidance layer's hand-over of the unconditional prediction (CFG++ samplers), and properties of the
new samplers beyond the reference trajectories."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from reference import Toy
from test_sampler_trajectories import SDE_FIRST_SIGMA, SHIFT, WINDOW_RANGES, ListNoise, noise_draws
from torch_toy import start_latent, torch_predict

from schedulers.guidance import guided_denoiser, negative_ranges
from schedulers.samplers import CFG_PP, run, sample_euler
from schedulers.sigmas import sigmas_for
from schedulers.stepping import Denoiser, split_guidance


def test_with_uncond_evaluates_the_negatives_even_at_cfg_1(toy: Toy) -> None:
    log: list = []
    denoiser = guided_denoiser(torch_predict(toy, log), cfg=1.0, ranges=WINDOW_RANGES)
    x = torch.from_numpy(start_latent(2, 1.0)).float()
    plain = denoiser(x, 1.0)
    assert log == [(1.0, ())]  # the cfg-1 shortcut: no uncond pass
    guided, uncond = denoiser.with_uncond(x, 1.0)
    assert log[1] == (1.0, ("negative",))
    expected_uncond = torch.from_numpy(toy.denoised(x.double().numpy(), 1.0, "negative")).float()
    torch.testing.assert_close(uncond, expected_uncond, atol=0, rtol=0)
    torch.testing.assert_close(guided, uncond + 1.0 * (plain - uncond), atol=0, rtol=0)


def test_with_uncond_is_the_call_path_bit_for_bit_and_zero_in_a_gap(toy: Toy) -> None:
    ranges = negative_ranges(start=0.5, stop=1.0, shift=SHIFT, wiring="a", rule="current")
    denoiser = guided_denoiser(torch_predict(toy), cfg=4.5, ranges=ranges)
    x = torch.from_numpy(start_latent(1, 1.0)).float()
    for sigma in (1.0, 0.9, 0.5, 0.05):  # 0.9 lies in wiring A's gap (0.1 < percent < 0.5)
        guided, uncond = denoiser.with_uncond(x, sigma)
        assert torch.equal(guided, denoiser(x, sigma))
        if sigma == 0.9:
            assert not uncond.any()


def test_a_plain_denoiser_hands_over_its_prediction_as_the_uncond(toy: Toy) -> None:
    def plain(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.5 * x

    x = torch.ones(1, 4, 2, 2)
    guided, uncond = split_guidance(plain)(x, 0.5)
    assert torch.equal(guided, uncond) and torch.equal(guided, 0.5 * x)


def test_euler_cfg_pp_without_guidance_is_euler(toy: Toy) -> None:
    # With D_u = D, x' = α'·D + σ'(x − α·D)/σ is Euler's (σ'/σ)·x + (1 − σ'/σ)·D.
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)

    def plain(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return denoiser(x, sigma)

    sigmas = sigmas_for("sgm_uniform", steps=12, shift=SHIFT)
    x = torch.from_numpy(start_latent(2, 1.0)).float()
    torch.testing.assert_close(
        run("euler_cfg_pp", plain, x, sigmas), sample_euler(plain, x, sigmas), atol=2e-6, rtol=0
    )


@pytest.mark.parametrize("sampler", sorted(CFG_PP))
def test_cfg_pp_samplers_use_the_uncond_so_they_differ_from_plain_guidance(toy: Toy, sampler: str) -> None:
    sigmas = sigmas_for("sgm_uniform", steps=6, shift=SHIFT)
    x = torch.from_numpy(start_latent(1, 1.0)).float()
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)

    def plain(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return denoiser(x, sigma)

    def sample_with(d: Denoiser) -> torch.Tensor:
        noise = ListNoise(noise_draws(12, tuple(x.shape)))
        return run(sampler, d, x, sigmas, noise=noise, shift=SHIFT)

    assert (sample_with(denoiser) - sample_with(plain)).abs().max() > 1e-2


def test_dpmpp_sde_float32_scalars_matter_at_the_offset_first_sigma(toy: Toy) -> None:
    # Issue 15: upstream evaluates DPM++ SDE's step scalars in float32. The reference in float32
    # matches us to 1e-5 (test_sampler_trajectories); the float64 one is off by a measurable amount: at
    # the offset first sigma σ_down comes out 0.0234 in float32 against 0.0245 in float64 (N = 10), which
    # moves this toy's state by ~5e-6 (more on latents whose D differs more from x).
    sigmas = sigmas_for("sgm_uniform", steps=10, shift=SHIFT)
    values = [float(s) for s in sigmas]
    x0 = start_latent(2, 1.0)
    draws = noise_draws(2 * len(values), x0.shape)
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)
    ours = run(
        "dpmpp_sde", denoiser, torch.from_numpy(x0).float(), sigmas, noise=ListNoise(draws), shift=SHIFT
    ).numpy()
    model = toy.guided(cfg=5.0, ranges=ref.windows(0.1, 1.0, SHIFT, "a", "current"))
    f32 = ref.dpmpp_sde(model, x0, values, draws, first_sigma=SDE_FIRST_SIGMA, float32=True)
    f64 = ref.dpmpp_sde(model, x0, values, draws, first_sigma=SDE_FIRST_SIGMA)
    np.testing.assert_allclose(ours, f32, atol=1e-5, rtol=1e-5)
    assert np.abs(ours - f64).max() > 1e-6


def test_ipndm_v_order_2_is_variable_step_adams_bashforth() -> None:
    s = [1.0, 0.9, 0.75, 0.6, 0.4, 0.3]
    from schedulers.multistep import _ipndm_v_weights

    np.testing.assert_allclose(_ipndm_v_weights(s, 4, 2), ref.adams_bashforth_weights(s, 4, 2), rtol=1e-12)
    equal = [1.0, 0.8, 0.6, 0.4, 0.2]
    np.testing.assert_allclose(_ipndm_v_weights(equal, 2, 3), [23 / 12, -16 / 12, 5 / 12], rtol=1e-12)


def test_sa_solver_draws_noise_only_inside_its_window_and_needs_the_shift(toy: Toy) -> None:
    from schedulers.sigmas import percent_to_sigma

    sigmas = sigmas_for("sgm_uniform", steps=12, shift=SHIFT)
    x = torch.from_numpy(start_latent(1, 1.0)).float()
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)
    noise = ListNoise(noise_draws(12, tuple(x.shape)))
    run("sa_solver", denoiser, x, sigmas, noise=noise, shift=SHIFT)
    high = percent_to_sigma(0.2, shift=SHIFT, rule="current")
    low = percent_to_sigma(0.8, shift=SHIFT, rule="current")
    targets = [target for _, target in noise.calls]
    assert targets and all(low <= t <= high for t in targets)
    assert targets == [float(s) for s in sigmas[1:-1] if low <= float(s) <= high]
    with pytest.raises(ValueError, match="shift"):
        partial = sigmas_for("sgm_uniform", steps=4, shift=SHIFT, denoise=0.5)
        run("sa_solver", denoiser, x, partial, noise=noise)


@pytest.mark.parametrize("pece", [False, True])
def test_sa_solver_float32_weights_stay_close_to_float64_ones(toy: Toy, pece: bool) -> None:
    from schedulers.sa_solver import sa_solver

    sigmas = sigmas_for("sgm_uniform", steps=25, shift=SHIFT)
    x = torch.from_numpy(start_latent(2, 1.0)).float()
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)

    def sample_in(dtype: torch.dtype) -> torch.Tensor:
        noise = ListNoise(noise_draws(30, tuple(x.shape)))
        return sa_solver(
            denoiser, x, sigmas, noise=noise, callback=None, shift=SHIFT, pece=pece, scalar_dtype=dtype
        )

    # Upstream's weights come from a float32 Vandermonde solve; on this toy that rounding stays small.
    assert float((sample_in(torch.float32) - sample_in(torch.float64)).abs().max()) < 1e-4
