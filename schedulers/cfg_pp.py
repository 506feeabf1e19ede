"""The CFG++ samplers (Chung et al. 2024, "CFG++: manifold-constrained classifier-free guidance") as
ComfyUI runs them on a flow (CONST) model.

A CFG++ step moves towards the guided prediction D but re-noises along the *unconditional* direction
(x − D_u)/σ, so each needs D_u from the guidance layer (`split_guidance`). Upstream disables its cfg-1
shortcut for them: the negatives are evaluated at every guidance. Which λ each one uses follows
upstream: euler(_ancestral)_cfg_pp works in the flow's α = 1 − σ, the DPM++ ones in λ = −log σ (the VE
form, as plain dpmpp_2m does).
"""

from __future__ import annotations

import math

import torch

from schedulers.noise import NoiseSource
from schedulers.sigmas import to_float32
from schedulers.stepping import (
    Denoiser,
    StepCallback,
    done,
    required,
    sigma_values,
    split_guidance,
    ve_ancestral,
)


def sample_euler_cfg_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler CFG++: x ← α_{i+1}·D + σ_{i+1}·(x − α_i·D_u)/σ_i with α = 1 − σ; the last step returns D."""
    return _euler_ancestral_cfg_pp(denoiser, x, sigmas, noise=None, callback=callback, eta=0.0)


def sample_euler_ancestral_cfg_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler ancestral CFG++ (η = 1): the VE ancestral split of the VP-scaled sigmas σ/α, the Euler
    part along D_u's direction, then α_{i+1}·σ_up·z."""
    source = required(noise, "euler_ancestral_cfg_pp")
    return _euler_ancestral_cfg_pp(denoiser, x, sigmas, noise=source, callback=callback, eta=1.0)


def _euler_ancestral_cfg_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None,
    callback: StepCallback | None,
    eta: float,
) -> torch.Tensor:
    split = split_guidance(denoiser)
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        denoised, uncond = split(x, sigma[i])
        if sigma[i + 1] == 0:
            x = denoised
        else:
            alpha, alpha_next = 1 - sigma[i], 1 - sigma[i + 1]
            slope = (x - alpha * uncond) / sigma[i]
            if not eta:
                down, up = sigma[i + 1] / alpha_next, 0.0
            elif alpha == 0:
                # σ_i = 1: the VP-scaled start sigma is infinite and upstream's split comes out as
                # σ_down = 0, σ_up = σ_{i+1}/α_{i+1} (its float arithmetic meets inf/inf = nan, and
                # min(σ_to, nan) keeps σ_to).
                down, up = 0.0, sigma[i + 1] / alpha_next
            else:
                down, up = ve_ancestral(sigma[i] / alpha, sigma[i + 1] / alpha_next, eta)
            x = alpha_next * denoised + (alpha_next * down) * slope
            if eta > 0 and noise is not None:
                x = x + noise(sigma[i], sigma[i + 1], x) * (alpha_next * up)
        done(callback, i, total)
    return x


def sample_dpmpp_2m_cfg_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM++ 2M CFG++ in λ = −log σ: x ← D + r·(x − D_u') with r = σ_{i+1}/σ_i, where D_u' is D_u
    corrected by the previous step's D_u (the 2M extrapolation, applied to the uncond only). The
    first step and the last one (which returns D) are first order."""
    split = split_guidance(denoiser)
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    previous: torch.Tensor | None = None
    for i in range(total):
        denoised, uncond = split(x, sigma[i])
        if sigma[i + 1] == 0:
            x = denoised  # e^{−h} = 0: upstream's D + (−0·D_u) + 0·x
        else:
            h = math.log(sigma[i] / sigma[i + 1])
            ratio = math.exp(-h)
            mix = -ratio * uncond
            if previous is not None:
                rho = math.log(sigma[i - 1] / sigma[i]) / h
                mix = mix - math.expm1(-h) * (1 / (2 * rho)) * (denoised - previous)
            x = denoised + mix + ratio * x
        previous = uncond
        done(callback, i, total)
    return x


def sample_dpmpp_2s_ancestral_cfg_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM++ 2S ancestral CFG++ (η = 1) in λ = −log σ with upstream's VE ancestral split (it has no
    rectified-flow variant): a half step to σ_s = √(σ_i·σ_down), a full step to σ_down using D at
    σ_s, then σ_up·z. The CFG++ shift x + (D − D_u) of the full step uses the uncond of the *second*
    evaluation, as upstream's shared slot holds it by then."""
    source = required(noise, "dpmpp_2s_ancestral_cfg_pp")
    split = split_guidance(denoiser)
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        denoised, uncond = split(x, sigma[i])
        down, up = ve_ancestral(sigma[i], sigma[i + 1])
        if down == 0:
            x = denoised + (x - uncond) / sigma[i] * down
        else:
            h = math.log(sigma[i] / down)
            half = to_float32(math.exp(-(-math.log(sigma[i]) + h / 2)))
            x_half = (half / sigma[i]) * (x + (denoised - uncond)) - math.expm1(-h / 2) * denoised
            denoised_half, uncond = split(x_half, half)
            x = (down / sigma[i]) * (x + (denoised - uncond)) - math.expm1(-h) * denoised_half
        if sigma[i + 1] > 0:
            x = x + source(sigma[i], sigma[i + 1], x) * up
        done(callback, i, total)
    return x
