"""`schedulers.sigmas_for` and `schedulers.sample`: the model-free entry points other programs call."""

from __future__ import annotations

import pytest
import torch

import schedulers
from schedulers.sigmas import sigmas_for as raw_sigmas_for


def test_sigmas_for_applies_the_discard_rule_of_the_named_sampler() -> None:
    plain = schedulers.sigmas_for("sgm_uniform", 10)
    assert torch.equal(plain, raw_sigmas_for("sgm_uniform", steps=10, shift=3.0))
    dpm2 = schedulers.sigmas_for("sgm_uniform", 10, sampler="dpm_2")
    assert torch.equal(dpm2, raw_sigmas_for("sgm_uniform", steps=10, shift=3.0, discard_penultimate=True))
    assert len(plain) == len(dpm2) == 11 and not torch.equal(plain, dpm2)


def test_sample_runs_a_deterministic_sampler_without_a_seed() -> None:
    sigmas = schedulers.sigmas_for("simple", 10)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.5 * x  # any D works for the plumbing; trajectories are pinned elsewhere

    out = schedulers.sample("dpmpp_2m", denoiser, x, sigmas)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, schedulers.sample("dpmpp_2m", denoiser, x, sigmas, seed=5))


def test_stochastic_samplers_need_a_seed_and_repeat_with_it() -> None:
    sigmas = schedulers.sigmas_for("simple", 10)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.5 * x

    with pytest.raises(ValueError, match="seed"):
        schedulers.sample("euler_ancestral", denoiser, x, sigmas)
    for sampler in ("euler_ancestral", "dpmpp_2m_sde"):
        first = schedulers.sample(sampler, denoiser, x, sigmas, seed=3)
        assert torch.equal(first, schedulers.sample(sampler, denoiser, x, sigmas, seed=3))
        assert not torch.equal(first, schedulers.sample(sampler, denoiser, x, sigmas, seed=4))
    with pytest.raises(ValueError, match="unknown sampler"):
        schedulers.sample("magic", denoiser, x, sigmas)
