"""Deterministic multistep and multi-stage samplers of ComfyUI beyond the classic ones: heunpp2, iPNDM
(fixed and variable step), res_multistep and gradient estimation (each also with CFG++ and, for
res_multistep, ancestral noise). All work on the slope d = (x − D)/σ or in λ = −log σ as upstream
does, even for flow models; step coefficients are Python floats from the float32 schedule values.
"""

from __future__ import annotations

import math

import torch

from schedulers.noise import NoiseSource
from schedulers.stepping import (
    Denoiser,
    StepCallback,
    done,
    required,
    sigma_values,
    split_guidance,
    ve_ancestral,
)

_IPNDM_ORDER = 4
_GE_GAMMA = 2.0


def sample_heunpp2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Heun++ (2nd-order variant): the slope is a weighted mean of the slopes at σ_i and at Euler
    predictions for the next one or two sigmas, weighted by σ/(k·σ_0) (k = 2 or 3 nodes). The step
    into the last sigma is Euler, the one before it Heun-like; up to 3 evaluations per step."""
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    end = sigma[-1]
    for i in range(total):
        slope = (x - denoiser(x, sigma[i])) / sigma[i]
        dt = sigma[i + 1] - sigma[i]
        if sigma[i + 1] == end:
            x = x + slope * dt
        else:
            x_2 = x + slope * dt
            slope_2 = (x_2 - denoiser(x_2, sigma[i + 1])) / sigma[i + 1]
            if sigma[i + 2] == end:
                w_2 = sigma[i + 1] / (2 * sigma[0])
                x = x + (slope * (1 - w_2) + slope_2 * w_2) * dt
            else:
                x_3 = x_2 + slope_2 * (sigma[i + 2] - sigma[i + 1])
                slope_3 = (x_3 - denoiser(x_3, sigma[i + 2])) / sigma[i + 2]
                w_2 = sigma[i + 1] / (3 * sigma[0])
                w_3 = sigma[i + 2] / (3 * sigma[0])
                x = x + ((1 - w_2 - w_3) * slope + w_2 * slope_2 + w_3 * slope_3) * dt
        done(callback, i, total)
    return x


def sample_ipndm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Improved PNDM: Adams–Bashforth of order up to 4 on the slope with the fixed equal-step weights
    (3, −1)/2, (23, −16, 5)/12, (55, −59, 37, −9)/24, warming up from Euler; the last step returns D."""
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    history: list[torch.Tensor] = []  # previous slopes, newest first
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        slope = (x - denoised) / sigma[i]
        dt = sigma[i + 1] - sigma[i]
        order = min(_IPNDM_ORDER, i + 1)
        if sigma[i + 1] == 0:
            x = denoised
        elif order == 1:
            x = x + dt * slope
        elif order == 2:
            x = x + dt * (3 * slope - history[0]) / 2
        elif order == 3:
            x = x + dt * (23 * slope - 16 * history[0] + 5 * history[1]) / 12
        else:
            x = x + dt * (55 * slope - 59 * history[0] + 37 * history[1] - 9 * history[2]) / 24
        history = [slope, *history][: _IPNDM_ORDER - 1]
        done(callback, i, total)
    return x


def sample_ipndm_v(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """iPNDM with variable steps: the Adams–Bashforth weights of order up to 4 recomputed from the
    actual sigma gaps (as the diff-solvers code upstream adopts); the last step returns D."""
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    history: list[torch.Tensor] = []  # previous slopes, newest first
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        slope = (x - denoised) / sigma[i]
        dt = sigma[i + 1] - sigma[i]
        order = min(_IPNDM_ORDER, i + 1)
        if sigma[i + 1] == 0:
            x = denoised
        elif order == 1:
            x = x + dt * slope
        else:
            weights = _ipndm_v_weights(sigma, i, order)
            combined = weights[0] * slope
            for weight, past in zip(weights[1:], history, strict=False):
                combined = combined + weight * past
            x = x + dt * combined
        history = [slope, *history][: _IPNDM_ORDER - 1]
        done(callback, i, total)
    return x


def _ipndm_v_weights(sigma: list[float], i: int, order: int) -> list[float]:
    """The variable-step Adams–Bashforth weights (newest slope first) for the step σ_i → σ_{i+1}."""
    h = sigma[i + 1] - sigma[i]
    h_1 = sigma[i] - sigma[i - 1]
    base = [(2 + h / h_1) / 2, -(h / h_1) / 2]
    if order == 2:
        return base
    h_2 = sigma[i - 1] - sigma[i - 2]
    t_1 = (1 - h / (3 * (h + h_1)) * (h * (h + h_1)) / (h_1 * (h_1 + h_2))) / 2
    if order == 3:
        return [base[0] + t_1, base[1] - (1 + h_1 / h_2) * t_1, t_1 * h_1 / h_2]
    h_3 = sigma[i - 2] - sigma[i - 3]
    t_2 = (
        ((1 - h / (3 * (h + h_1))) / 2 + (1 - h / (2 * (h + h_1))) * h / (6 * (h + h_1 + h_2)))
        * (h * (h + h_1) * (h + h_1 + h_2))
        / (h_1 * (h_1 + h_2) * (h_1 + h_2 + h_3))
    )
    q = h_1 * (h_1 + h_2) / (h_2 * (h_2 + h_3))
    return [
        base[0] + t_1 + t_2,
        base[1] - (1 + h_1 / h_2) * t_1 - (1 + h_1 / h_2 + q) * t_2,
        t_1 * h_1 / h_2 + (h_1 / h_2 + q * (1 + h_2 / h_3)) * t_2,
        -t_2 * q * h_1 / h_2,
    ]


def res_multistep(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None,
    callback: StepCallback | None,
    eta: float,
    cfg_pp: bool,
) -> torch.Tensor:
    """RES 2nd-order multistep (Zhang et al. 2023, arXiv 2308.02157) in λ = −log σ.

    Each step goes to σ_down of the VE ancestral split (σ_{i+1} itself at η = 0): Euler on the first
    step and when σ_down = 0, else x ← e^{−h}·x + h·(b₁·D + b₂·D_prev) with φ-function weights and
    c₂ = (λ_{i−1} − λ(σ_down,prev))/h; then σ_up·z. With CFG++ the step is taken from x + (D − D_u)
    along D_u, and D_u is the history."""
    split = split_guidance(denoiser)
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    previous: torch.Tensor | None = None
    previous_down = 0.0
    for i in range(total):
        if cfg_pp:
            denoised, uncond = split(x, sigma[i])
        else:
            denoised = uncond = denoiser(x, sigma[i])
        down, up = ve_ancestral(sigma[i], sigma[i + 1], eta)
        if down == 0 or previous is None:
            if cfg_pp:
                x = denoised + (x - uncond) / sigma[i] * down
            else:
                x = x + (x - denoised) / sigma[i] * (down - sigma[i])
        else:
            h = math.log(sigma[i] / down)
            c_2 = (math.log(previous_down / sigma[i - 1])) / h
            phi_1 = math.expm1(-h) / -h
            phi_2 = (phi_1 - 1) / -h
            b_1, b_2 = _finite(phi_1 - phi_2 / c_2), _finite(phi_2 / c_2)
            if cfg_pp:
                x = x + (denoised - uncond)
            x = math.exp(-h) * x + h * (b_1 * uncond + b_2 * previous)
        if sigma[i + 1] > 0 and up > 0:
            x = x + required(noise, "res_multistep_ancestral")(sigma[i], sigma[i + 1], x) * up
        previous, previous_down = uncond, down
        done(callback, i, total)
    return x


def _finite(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def sample_res_multistep(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """res_multistep, deterministic (η = 0): see `res_multistep`."""
    return res_multistep(denoiser, x, sigmas, noise=None, callback=callback, eta=0.0, cfg_pp=False)


def sample_res_multistep_cfg_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """res_multistep with CFG++, deterministic: see `res_multistep`."""
    return res_multistep(denoiser, x, sigmas, noise=None, callback=callback, eta=0.0, cfg_pp=True)


def sample_res_multistep_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """res_multistep with ancestral noise (η = 1): see `res_multistep`."""
    source = required(noise, "res_multistep_ancestral")
    return res_multistep(denoiser, x, sigmas, noise=source, callback=callback, eta=1.0, cfg_pp=False)


def sample_res_multistep_ancestral_cfg_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """res_multistep ancestral (η = 1) with CFG++: see `res_multistep`."""
    source = required(noise, "res_multistep_ancestral_cfg_pp")
    return res_multistep(denoiser, x, sigmas, noise=source, callback=callback, eta=1.0, cfg_pp=True)


def gradient_estimation(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: StepCallback | None, cfg_pp: bool
) -> torch.Tensor:
    """Gradient estimation (Permenter & Yuan, γ = 2): Euler plus (γ − 1)·(d − d_prev)·Δσ from the
    second step on; the last step returns D. With CFG++ the slope is taken along D_u and the Euler
    part is D + σ_{i+1}·d."""
    split = split_guidance(denoiser)
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    previous: torch.Tensor | None = None
    for i in range(total):
        if cfg_pp:
            denoised, uncond = split(x, sigma[i])
        else:
            denoised = uncond = denoiser(x, sigma[i])
        slope = (x - uncond) / sigma[i]
        dt = sigma[i + 1] - sigma[i]
        if sigma[i + 1] == 0:
            x = denoised
        else:
            x = denoised + slope * sigma[i + 1] if cfg_pp else x + slope * dt
            if previous is not None:
                x = x + (_GE_GAMMA - 1) * (slope - previous) * dt
        previous = slope
        done(callback, i, total)
    return x


def sample_gradient_estimation(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Gradient estimation: see `gradient_estimation`."""
    return gradient_estimation(denoiser, x, sigmas, callback=callback, cfg_pp=False)


def sample_gradient_estimation_cfg_pp(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Gradient estimation with CFG++: see `gradient_estimation`."""
    return gradient_estimation(denoiser, x, sigmas, callback=callback, cfg_pp=True)
