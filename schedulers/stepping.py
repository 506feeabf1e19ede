"""What every sampler module shares: the denoiser and callback types, and the small step helpers.

Kept apart from the sampler registry (`schedulers.samplers`) so that the sampler families living in
their own modules (`cfg_pp`, `multistep`, `stochastic`) can use them without importing the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from schedulers.noise import NoiseSource
from schedulers.sigmas import percent_to_sigma, to_float32

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
"""D(x, σ): the CFG-combined denoised float32 prediction; σ is the float32 value as a Python float."""

SplitDenoiser = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
"""(D, D_u)(x, σ): the CFG-combined prediction and the unconditional one it was built from."""

StepCallback = Callable[[int, int], None]
"""callback(i, total): step i (0-based) of `total` is done; it may raise to abort sampling."""


Sampler = Callable[..., torch.Tensor]
"""sampler(denoiser, x, sigmas, *, callback=None, ...) → the final float32 state.

`x` is the already-noised start (σ0·noise for txt2img). Each sampler takes only the keyword arguments it
uses, as k-diffusion's do: `noise` (a `NoiseSource`, from `noise_for`) for the stochastic ones, `shift`
(the model's flow shift) for those that move a first sigma of 1 or place a noise window by percent.
`schedulers.samplers.run` hands each one what it takes.
"""


@runtime_checkable
class HandsOverUncond(Protocol):
    """A guided denoiser that can also hand over its unconditional prediction (CFG++ samplers need it)."""

    def with_uncond(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]: ...


def split_guidance(denoiser: Denoiser) -> SplitDenoiser:
    """The (D, D_u) view of a denoiser. A plain denoiser carries no guidance, so its D_u is D itself:
    a CFG++ sampler then runs as its plain twin would at guidance 1 with an uncond equal to the cond."""
    if isinstance(denoiser, HandsOverUncond):
        return denoiser.with_uncond

    def unguided(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        denoised = denoiser(x, sigma)
        return denoised, denoised

    return unguided


def sigma_values(sigmas: torch.Tensor) -> list[float]:
    return [float(value) for value in sigmas.detach().to(device="cpu", dtype=torch.float32)]


def done(callback: StepCallback | None, step: int, total: int) -> None:
    if callback is not None:
        callback(step, total)


def required(noise: NoiseSource | None, sampler: str) -> NoiseSource:
    if noise is None:
        raise ValueError(f"{sampler} is stochastic and needs a noise source (see noise_for)")
    return noise


def half_log_snr(sigma: float) -> float:
    """λ = log((1−σ)/σ), the flow model's half log signal-to-noise ratio."""
    return math.log((1 - sigma) / sigma)


def offset_first_sigma(sigmas: torch.Tensor, shift: float | None, sampler: str) -> list[float]:
    """The schedule as floats, with a first sigma ≥ 1 (λ = −∞) moved to percent_to_sigma(1e-4), as
    upstream's half-log-SNR samplers do for flow models; the model is evaluated there too."""
    sigma = sigma_values(sigmas)
    if len(sigma) > 1 and sigma[0] >= 1.0:
        if shift is None:
            raise ValueError(f"{sampler} needs the model's shift to offset a first sigma of 1")
        sigma[0] = to_float32(percent_to_sigma(1e-4, shift=shift, rule="current"))
    return sigma


def ve_ancestral(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of the classic variance-exploding ancestral split: σ_up² is η² times the
    posterior variance, capped at σ_to², and σ_down² = σ_to² − σ_up². η = 0 is the deterministic step."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up
