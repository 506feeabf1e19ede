"""Sampling math for SD3 as ComfyUI does it: pure tensor and float code, usable without a model.

The two calls most programs need:

    sigmas = schedulers.sigmas_for("sgm_uniform", 25, shift=3.0, sampler="dpmpp_2m")
    x0 = schedulers.sample("dpmpp_2m", denoiser, sigmas[0] * noise, sigmas, seed=seed)

where `denoiser(x, sigma) -> D` works in the flow convention D = x − σ·v (docs/sampling.md §1).
"""

from __future__ import annotations

import functools

import torch

from schedulers import sigmas as _sigmas
from schedulers.samplers import DISCARD_PENULTIMATE, SAMPLERS, STOCHASTIC, noise_for, run
from schedulers.stepping import Denoiser, StepCallback


def sigmas_for(
    schedule: str, steps: int, shift: float = 3.0, denoise: float = 1.0, sampler: str | None = None
) -> torch.Tensor:
    """The float32 sigmas (ending in 0) that `sampler` runs for `steps` steps of `schedule`.

    Naming the sampler applies KSampler's discard-penultimate rule for dpm_2 / uni_pc (docs/sampling.md §2).
    """
    return _sigmas.sigmas_for(
        schedule,
        steps=steps,
        shift=shift,
        denoise=denoise,
        discard_penultimate=sampler in DISCARD_PENULTIMATE,
    )


def sample(
    sampler: str,
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    seed: int | None = None,
    shift: float = 3.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run `sampler` from `x` (already at sigmas[0]) down the schedule; returns the final latent.

    Stochastic samplers draw their per-step noise from `seed` exactly as docs/sampling.md §7 says, so they
    need one; deterministic samplers ignore it.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(sorted(SAMPLERS))}")
    if seed is None and sampler in STOCHASTIC:
        raise ValueError(f"sampler {sampler!r} draws noise at every step: pass seed=")
    noise = None if seed is None else noise_for(sampler, seed=seed, sigmas=sigmas, like=x)
    return run(sampler, denoiser, x, sigmas, noise=noise, shift=shift, callback=callback)


# Samplers whose number of denoiser calls depends on the model's output (step-size control), so no
# count is known before a run.
ADAPTIVE = frozenset({"dpm_adaptive"})


@functools.lru_cache(maxsize=4096)
def denoiser_calls(sampler: str, sigmas: tuple[float, ...]) -> int | None:
    """How many times `sampler` calls its denoiser down `sigmas`; None for an adaptive sampler.

    Counted by running the sampler itself on a one-element latent and a linear denoiser, so the
    count can never fall out of step with the code (a multistep method reuses evaluations, a Heun
    step makes two, and the last step's second stage is skipped where σ reaches 0).
    """
    if sampler in ADAPTIVE:
        return None
    calls = 0

    def count(x: torch.Tensor, sigma: float) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return 0.9 * x

    schedule = torch.tensor(sigmas, dtype=torch.float32)
    sample(sampler, count, schedule[0] * torch.ones(1, 1, 1, 1), schedule, seed=0)
    return calls


__all__ = ["ADAPTIVE", "SAMPLERS", "denoiser_calls", "sample", "sigmas_for"]
