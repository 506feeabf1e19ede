from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest
import reference as ref
import torch
from reference import Toy
from torch_toy import start_latent, torch_predict

from schedulers.guidance import guided_denoiser, negative_ranges
from schedulers.noise import NoiseSource
from schedulers.samplers import (
    CFG_PP,
    DISCARD_PENULTIMATE,
    SAMPLERS,
    STOCHASTIC,
    noise_for,
    run,
    sample_dpmpp_2m,
    sample_euler,
)
from schedulers.sigmas import percent_to_sigma, sigmas_for, to_float32

SHIFT = 3.0
SDE_FIRST_SIGMA = to_float32(percent_to_sigma(1e-4, shift=SHIFT, rule="current"))

REFERENCES: dict[str, Callable] = {
    "euler": lambda model, x, s, noise: ref.euler(model, x, s),
    "ddim": lambda model, x, s, noise: ref.euler(model, x, s),
    "heun": lambda model, x, s, noise: ref.heun(model, x, s),
    "dpmpp_2m": lambda model, x, s, noise: ref.dpmpp_2m(model, x, s),
    "dpm_2": lambda model, x, s, noise: ref.dpm_2(model, x, s),
    "lms": lambda model, x, s, noise: ref.lms(model, x, s),
    "euler_ancestral": ref.euler_ancestral_rf,
    "dpm_2_ancestral": ref.dpm_2_ancestral_rf,
    "dpmpp_2s_ancestral": ref.dpmpp_2s_ancestral_rf,
    "dpmpp_2m_sde": lambda model, x, s, noise: ref.dpmpp_2m_sde(
        model, x, s, noise, first_sigma=SDE_FIRST_SIGMA
    ),
    # upstream computes dpmpp_sde's step scalars in float32, and at the offset first sigma that rounding
    # is worth up to ~1e-3 in the state: the reference emulates it (test_dpmpp_sde_float32_scalars_matter).
    "dpmpp_sde": lambda model, x, s, noise: ref.dpmpp_sde(
        model, x, s, noise, first_sigma=SDE_FIRST_SIGMA, float32=True
    ),
    "dpmpp_3m_sde": lambda model, x, s, noise: ref.dpmpp_3m_sde(
        model, x, s, noise, first_sigma=SDE_FIRST_SIGMA
    ),
    "uni_pc": lambda model, x, s, noise: ref.uni_pc(model, x, s),
    "uni_pc_bh2": lambda model, x, s, noise: ref.uni_pc(model, x, s, bh2=True),
    "deis": lambda model, x, s, noise: ref.deis(model, x, s),
    "heunpp2": lambda model, x, s, noise: ref.heunpp2(model, x, s),
    "ipndm": lambda model, x, s, noise: ref.ipndm(model, x, s),
    "ipndm_v": lambda model, x, s, noise: ref.ipndm(model, x, s, variable=True),
    "lcm": ref.lcm,
    # DDPM's 1 − ᾱ keeps few digits in float32 at small σ: the reference rounds its scalars like upstream.
    "ddpm": lambda model, x, s, noise: ref.ddpm(model, x, s, noise, float32=True),
    "res_multistep": lambda model, x, s, noise: ref.res_multistep(
        _unsplit(model), x, s, noise, eta=0.0, cfg_pp=False
    ),
    "res_multistep_ancestral": lambda model, x, s, noise: ref.res_multistep(
        _unsplit(model), x, s, noise, eta=1.0, cfg_pp=False
    ),
    "gradient_estimation": lambda model, x, s, noise: ref.gradient_estimation(
        _unsplit(model), x, s, cfg_pp=False
    ),
    "dpmpp_2m_sde_heun": lambda model, x, s, noise: ref.dpmpp_2m_sde_heun(
        model, x, s, noise, first_sigma=SDE_FIRST_SIGMA
    ),
    "er_sde": lambda model, x, s, noise: ref.er_sde(model, x, s, noise, first_sigma=SDE_FIRST_SIGMA),
    "seeds_2": lambda model, x, s, noise: ref.seeds(
        model, x, s, noise, stages=2, first_sigma=SDE_FIRST_SIGMA
    ),
    "seeds_3": lambda model, x, s, noise: ref.seeds(
        model, x, s, noise, stages=3, first_sigma=SDE_FIRST_SIGMA
    ),
    "dpm_fast": lambda model, x, s, noise: ref.dpm_fast(model, x, s),
    "dpm_adaptive": lambda model, x, s, noise: ref.dpm_adaptive(model, x, s),
    "sa_solver": lambda model, x, s, noise: ref.sa_solver(
        model, x, s, noise, first_sigma=SDE_FIRST_SIGMA, shift=SHIFT
    ),
    "sa_solver_pece": lambda model, x, s, noise: ref.sa_solver(
        model, x, s, noise, first_sigma=SDE_FIRST_SIGMA, shift=SHIFT, pece=True
    ),
}
# The _gpu twins run the same math as their CPU samplers (only the Brownian tree's device differs).
for _name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
    REFERENCES[f"{_name}_gpu"] = REFERENCES[_name]

# CFG++ samplers: their reference takes the split model (D, D_u), evaluated even at cfg 1.
SPLIT_REFERENCES: dict[str, Callable] = {
    "euler_cfg_pp": lambda split, x, s, noise: ref.euler_cfg_pp(split, x, s),
    "euler_ancestral_cfg_pp": ref.euler_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": lambda split, x, s, noise: ref.dpmpp_2m_cfg_pp(split, x, s),
    "dpmpp_2s_ancestral_cfg_pp": ref.dpmpp_2s_ancestral_cfg_pp,
    "res_multistep_cfg_pp": lambda split, x, s, noise: ref.res_multistep(
        split, x, s, noise, eta=0.0, cfg_pp=True
    ),
    "res_multistep_ancestral_cfg_pp": lambda split, x, s, noise: ref.res_multistep(
        split, x, s, noise, eta=1.0, cfg_pp=True
    ),
    "gradient_estimation_cfg_pp": lambda split, x, s, noise: ref.gradient_estimation(
        split, x, s, cfg_pp=True
    ),
}
SNR_SDE = (  # the half-log-SNR samplers that offset σ0 = 1
    *("dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde", "dpmpp_2m_sde_heun"),
    *("dpmpp_2m_sde_gpu", "dpmpp_sde_gpu", "dpmpp_3m_sde_gpu", "dpmpp_2m_sde_heun_gpu"),
    *("er_sde", "seeds_2", "seeds_3"),
)
EVALUATIONS_PER_STEP = {"heunpp2": 3, "seeds_3": 3, "dpm_fast": 1, "dpm_adaptive": 1}  # at most; else 2
# Upstream's UniPC computes its step weights in float32, and its φ_k recursion loses most digits when the
# step in λ = −log σ is small (near σ = 1, or with many steps): that is upstream's own rounding, which
# we reproduce and the float64 reference does not, worth up to ~5e-4 here (cfg 5, where D jumps at the
# negative-prompt switch). test_uni_pc_deis.py checks the same formulas at 1e-5 in float64.
TOLERANCE = {"uni_pc": 2e-3, "uni_pc_bh2": 2e-3}


def _unsplit(model: ref.RefDenoiser) -> ref.SplitDenoiser:
    def split(x: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        d = model(x, sigma)
        return d, d

    return split


class ListNoise:
    """Hands out a fixed list of noise tensors in order, so both sides see the same draws."""

    def __init__(self, draws: list[np.ndarray]) -> None:
        self.draws = draws
        self.calls: list[tuple[float, float]] = []

    def __call__(self, sigma: float, sigma_next: float, like: torch.Tensor) -> torch.Tensor:
        assert sigma_next < sigma and sigma_next > 0
        self.calls.append((sigma, sigma_next))
        return torch.from_numpy(self.draws[len(self.calls) - 1]).float()


def noise_draws(count: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(shape, generator=generator).numpy().astype(np.float64) for _ in range(count)]


def run_sampler(sampler: str, denoiser, x: torch.Tensor, sigmas: torch.Tensor, **kwargs) -> torch.Tensor:
    """Runs a sampler with the noise source it needs, as the pipeline would."""
    noise: NoiseSource | None = noise_for(sampler, seed=5, sigmas=sigmas, like=x)
    return run(sampler, denoiser, x, sigmas, noise=noise, shift=SHIFT, **kwargs)


WINDOW_RANGES = negative_ranges(start=0.1, stop=1.0, shift=SHIFT, wiring="a", rule="current")


def run_both(
    toy: Toy, sampler: str, *, steps: int, cfg: float, batch: int, schedule: str
) -> tuple[np.ndarray, np.ndarray]:
    sigmas = sigmas_for(
        schedule, steps=steps, shift=SHIFT, discard_penultimate=sampler in DISCARD_PENULTIMATE
    )
    values = [float(s) for s in sigmas]
    x0 = start_latent(batch, values[0])
    draws = noise_draws(3 * len(values), x0.shape)  # seeds_3 draws three times per step
    noise = ListNoise(draws)
    denoiser = guided_denoiser(torch_predict(toy), cfg=cfg, ranges=WINDOW_RANGES)
    ours = run(sampler, denoiser, torch.from_numpy(x0).float(), sigmas, noise=noise, shift=SHIFT)
    assert ours.dtype == torch.float32
    ranges = ref.windows(0.1, 1.0, SHIFT, "a", "current")
    if sampler in SPLIT_REFERENCES:
        expected = SPLIT_REFERENCES[sampler](toy.guided_split(cfg=cfg, ranges=ranges), x0, values, draws)
    else:
        expected = REFERENCES[sampler](toy.guided(cfg=cfg, ranges=ranges), x0, values, draws)
    return ours.numpy(), expected


ALL_REFERENCES = sorted({*REFERENCES, *SPLIT_REFERENCES})


def test_every_registered_sampler_has_a_reference() -> None:
    assert set(SAMPLERS) == set(ALL_REFERENCES)
    assert set(SPLIT_REFERENCES) == CFG_PP


@pytest.mark.parametrize("sampler", ALL_REFERENCES)
@pytest.mark.parametrize("cfg", [1.0, 5.0])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("steps", [1, 2, 3, 25])
def test_sampler_follows_the_numpy_reference(
    toy: Toy, sampler: str, cfg: float, batch: int, steps: int
) -> None:
    ours, expected = run_both(toy, sampler, steps=steps, cfg=cfg, batch=batch, schedule="sgm_uniform")
    tolerance = TOLERANCE.get(sampler, 1e-5)
    np.testing.assert_allclose(ours, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("sampler", ALL_REFERENCES)
@pytest.mark.parametrize("schedule", ["karras", "beta", "ddim_uniform"])
def test_sampler_follows_the_reference_on_other_schedules(toy: Toy, sampler: str, schedule: str) -> None:
    ours, expected = run_both(toy, sampler, steps=10, cfg=5.0, batch=2, schedule=schedule)
    # cfg 5 drives some of these latents to |x| ≈ 10, where float32 resolution is ~1e-6: scale the
    # O(1)-latent tolerance by the magnitude.
    tolerance = TOLERANCE.get(sampler, 1e-5) * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(ours, expected, atol=tolerance, rtol=1e-5)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_single_step_to_zero_returns_the_denoised_prediction(toy: Toy, sampler: str) -> None:
    sigmas = torch.tensor([1.0, 0.0])
    x = torch.from_numpy(start_latent(2, 1.0)).float()
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)
    # these SDEs evaluate just below 1
    sigma0 = SDE_FIRST_SIGMA if sampler in (*SNR_SDE, "sa_solver", "sa_solver_pece") else 1.0
    expected = denoiser(x, sigma0)
    if sampler.startswith("uni_pc"):
        # Upstream's UniPC has order min(3, steps − 1) = 0 for one step: it evaluates once and returns
        # the start state, scaled by 1/√(1+σ0²), 1/α(0.001) and 1/(1 − 0.001).
        expected = x / 2**0.5 / 0.99999952 / 0.999
    if sampler in ("dpm_fast", "dpm_adaptive"):
        # Upstream's DPM-Solver runs from the first sigma to the smallest non-zero one: here both are 1.
        expected = x
    torch.testing.assert_close(run_sampler(sampler, denoiser, x, sigmas), expected, atol=1e-6, rtol=0)


def test_dpmpp_2m_with_two_steps_is_euler_then_the_final_step(toy: Toy) -> None:
    sigmas = sigmas_for("sgm_uniform", steps=2, shift=3.0)
    x = torch.from_numpy(start_latent(1, 1.0)).float()
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)
    torch.testing.assert_close(
        sample_dpmpp_2m(denoiser, x, sigmas), sample_euler(denoiser, x, sigmas), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_callback_sees_every_step_and_can_abort(toy: Toy, sampler: str) -> None:
    sigmas = sigmas_for("sgm_uniform", steps=5, shift=3.0)
    x = torch.from_numpy(start_latent(1, 1.0)).float()
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)
    seen: list[tuple[int, int]] = []
    run_sampler(sampler, denoiser, x, sigmas, callback=lambda i, total: seen.append((i, total)))
    if sampler == "dpm_adaptive":
        # Its evaluation count is its own: it reports each one, the total growing past the schedule's.
        assert seen == [(i, max(5, i + 1)) for i in range(len(seen))] and len(seen) % 3 == 0
    else:
        assert seen == [(i, 5) for i in range(5)]

    class Cancelled(Exception):
        pass

    def cancel(i: int, total: int) -> None:
        if i == 1:
            raise Cancelled

    calls: list[float] = []

    def counting(x: torch.Tensor, sigma: float) -> torch.Tensor:
        calls.append(sigma)
        return denoiser(x, sigma)

    with pytest.raises(Cancelled):
        run_sampler(sampler, counting, x, sigmas, callback=cancel)
    # two steps of at most two (three) evaluations, nothing after the abort
    assert len(calls) <= 2 * EVALUATIONS_PER_STEP.get(sampler, 2)


def test_samplers_keep_a_float32_state_even_from_other_dtypes(toy: Toy) -> None:
    sigmas = sigmas_for("sgm_uniform", steps=3, shift=3.0)
    x = torch.from_numpy(start_latent(1, 1.0))  # float64 in
    denoiser = guided_denoiser(torch_predict(toy), cfg=1.0, ranges=())
    for sampler in SAMPLERS:
        assert run_sampler(sampler, denoiser, x, sigmas).dtype == torch.float32


@pytest.mark.parametrize(
    "sampler", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"]
)
def test_stochastic_samplers_draw_once_per_step_except_the_last(toy: Toy, sampler: str) -> None:
    sigmas = sigmas_for(
        "sgm_uniform", steps=6, shift=SHIFT, discard_penultimate=sampler in DISCARD_PENULTIMATE
    )
    values = [float(s) for s in sigmas]
    x = torch.from_numpy(start_latent(1, 1.0)).float()
    noise = ListNoise(noise_draws(10, tuple(x.shape)))
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)
    run(sampler, denoiser, x, sigmas, noise=noise, shift=SHIFT)
    expected = list(pairwise(values[:-1]))
    if sampler in SNR_SDE:
        expected[0] = (SDE_FIRST_SIGMA, values[1])  # queried from the offset first sigma
    assert noise.calls == expected


@pytest.mark.parametrize("sampler", sorted(STOCHASTIC))
def test_stochastic_samplers_refuse_to_run_without_noise(toy: Toy, sampler: str) -> None:
    sigmas = sigmas_for("sgm_uniform", steps=3, shift=SHIFT)
    denoiser = guided_denoiser(torch_predict(toy), cfg=1.0, ranges=())
    with pytest.raises(ValueError, match="noise"):
        run(sampler, denoiser, torch.zeros(1, 4, 6, 6), sigmas, shift=SHIFT)


@pytest.mark.parametrize("sampler", SNR_SDE)
def test_snr_sdes_need_the_shift_only_when_the_first_sigma_is_one(toy: Toy, sampler: str) -> None:
    denoiser = guided_denoiser(torch_predict(toy), cfg=1.0, ranges=())
    x = torch.from_numpy(start_latent(1, 1.0)).float()
    full = sigmas_for("sgm_uniform", steps=4, shift=SHIFT)
    with pytest.raises(ValueError, match="shift"):
        run(sampler, denoiser, x, full, noise=noise_for(sampler, seed=1, sigmas=full, like=x))
    partial = sigmas_for("sgm_uniform", steps=4, shift=SHIFT, denoise=0.5)
    noise = noise_for(sampler, seed=1, sigmas=partial, like=x)
    assert run(sampler, denoiser, x, partial, noise=noise).shape == x.shape


@pytest.mark.parametrize("sampler", sorted(STOCHASTIC))
def test_stochastic_samplers_repeat_with_the_same_seed_and_differ_with_another(
    toy: Toy, sampler: str
) -> None:
    sigmas = sigmas_for(
        "sgm_uniform", steps=5, shift=SHIFT, discard_penultimate=sampler in DISCARD_PENULTIMATE
    )
    x = torch.from_numpy(start_latent(1, 1.0)).float()
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=WINDOW_RANGES)

    def sample_with(seed: int) -> torch.Tensor:
        noise = noise_for(sampler, seed=seed, sigmas=sigmas, like=x)
        return run(sampler, denoiser, x, sigmas, noise=noise, shift=SHIFT)

    assert torch.equal(sample_with(8), sample_with(8))
    assert not torch.equal(sample_with(8), sample_with(9))


def test_each_sampler_takes_only_the_arguments_it_uses() -> None:
    import inspect

    for name, function in SAMPLERS.items():
        keywords = set(inspect.signature(function).parameters) - {"denoiser", "x", "sigmas"}
        assert "callback" in keywords, name
        assert ("noise" in keywords) == (name in STOCHASTIC), name
        if "shift" in keywords:  # only samplers that offset a first sigma of 1 or place a noise window
            assert name in (*SNR_SDE, "sa_solver", "sa_solver_pece"), name
