"""One pure function per ComfyUI sampler, in sigma space for a rectified-flow (CONST) model.

Every sampler integrates dx/dσ = (x − D(x, σ))/σ over a float32 state; they differ only in the
discretisation. Step coefficients are computed in Python floats from the float32 schedule values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from schedulers.noise import AncestralNoise, BrownianTreeNoise, NoiseSource
from schedulers.sigmas import percent_to_sigma, to_float32

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
"""D(x, σ): the CFG-combined denoised float32 prediction; σ is the float32 value as a Python float."""

StepCallback = Callable[[int, int], None]
"""callback(i, total): step i (0-based) of `total` is done; it may raise to abort sampling."""


class Sampler(Protocol):
    """sampler(denoiser, x, sigmas, *, noise, callback, shift) → the final float32 state.

    `x` is the already-noised start (σ0·noise for txt2img); `noise` is needed only by stochastic samplers
    (build it with `noise_for`); `shift` is the model's flow shift, needed only where a sampler moves a
    first sigma of 1 (dpmpp_2m_sde); the others ignore both.
    """

    def __call__(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        noise: NoiseSource | None = None,
        callback: StepCallback | None = None,
        shift: float | None = None,
    ) -> torch.Tensor: ...


def _sigma_values(sigmas: torch.Tensor) -> list[float]:
    return [float(value) for value in sigmas.detach().to(device="cpu", dtype=torch.float32)]


def _done(callback: StepCallback | None, step: int, total: int) -> None:
    if callback is not None:
        callback(step, total)


def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """Euler: x ← x + (σ_{i+1} − σ_i)·d_i. Also ComfyUI's `ddim`."""
    sigma = _sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        x = x + (x - denoised) / sigma[i] * (sigma[i + 1] - sigma[i])
        _done(callback, i, total)
    return x


def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """Heun: Euler predictor, trapezoidal corrector; the last step (to σ = 0) is plain Euler."""
    sigma = _sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        slope = (x - denoised) / sigma[i]
        dt = sigma[i + 1] - sigma[i]
        if sigma[i + 1] == 0:
            x = x + slope * dt
        else:
            predicted = x + slope * dt
            slope_next = (predicted - denoiser(predicted, sigma[i + 1])) / sigma[i + 1]
            x = x + (slope + slope_next) / 2 * dt
        _done(callback, i, total)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """DPM++ 2M with λ = −log σ (the VE form ComfyUI uses even for flow models).

    x_{i+1} = r·x_i + (1 − r)·D' with r = σ_{i+1}/σ_i; D' extrapolates D from the previous step except
    on the first step and the last one, which is first order and returns D.
    """
    sigma = _sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    previous: torch.Tensor | None = None
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        ratio = sigma[i + 1] / sigma[i]
        if previous is None or sigma[i + 1] == 0:
            x = ratio * x + (1 - ratio) * denoised
        else:
            rho = math.log(sigma[i - 1] / sigma[i]) / math.log(sigma[i] / sigma[i + 1])
            extrapolated = (1 + 1 / (2 * rho)) * denoised - (1 / (2 * rho)) * previous
            x = ratio * x + (1 - ratio) * extrapolated
        previous = denoised
        _done(callback, i, total)
    return x


def sample_dpm_2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """DPM2: the slope is taken at the log-midpoint sigma; the last step is Euler. Use it with the
    discard-penultimate schedule."""
    sigma = _sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        x = _dpm_2_step(denoiser, x, denoiser(x, sigma[i]), sigma=sigma[i], target=sigma[i + 1])
        _done(callback, i, total)
    return x


def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """Linear multistep of order up to 4 over the slope history; the last step returns D."""
    sigma = _sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    slopes: list[torch.Tensor] = []  # newest first
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        slopes = [(x - denoised) / sigma[i], *slopes][:_LMS_ORDER]
        if sigma[i + 1] == 0:
            x = denoised
        else:
            increment = torch.zeros_like(x)
            for j, slope in enumerate(slopes):
                increment = increment + _lms_coefficient(sigma, step=i, j=j, order=len(slopes)) * slope
            x = x + increment
        _done(callback, i, total)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """Euler ancestral, rectified-flow form (η = 1): Euler down to σ_d, then re-noise up to σ_{i+1}."""
    source = _required(noise, "euler_ancestral")
    sigma = _sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        if sigma[i + 1] == 0:
            x = denoised
        else:
            down, keep, renoise = _rf_ancestral(sigma[i], sigma[i + 1])
            ratio = down / sigma[i]
            x = ratio * x + (1 - ratio) * denoised
            x = keep * x + renoise * source(sigma[i], sigma[i + 1], x)
        _done(callback, i, total)
    return x


def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """DPM2 ancestral, rectified-flow form (η = 1): a DPM2 step down to σ_d, then the RF re-noise."""
    source = _required(noise, "dpm_2_ancestral")
    sigma = _sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        if sigma[i + 1] == 0:
            x = _dpm_2_step(denoiser, x, denoised, sigma=sigma[i], target=0.0)
        else:
            down, keep, renoise = _rf_ancestral(sigma[i], sigma[i + 1])
            x = _dpm_2_step(denoiser, x, denoised, sigma=sigma[i], target=down)
            x = keep * x + renoise * source(sigma[i], sigma[i + 1], x)
        _done(callback, i, total)
    return x


def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """DPM++ 2S ancestral, rectified-flow form (η = 1): a second evaluation at the half-log-SNR point
    between σ_i and σ_d, a step to σ_d with that prediction, then the RF re-noise."""
    source = _required(noise, "dpmpp_2s_ancestral")
    sigma = _sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        if sigma[i + 1] == 0:
            x = x + (x - denoised) / sigma[i] * (0.0 - sigma[i])
        else:
            down, keep, renoise = _rf_ancestral(sigma[i], sigma[i + 1])
            if sigma[i] == 1.0:
                half = 0.9999  # the log-SNR of σ = 1 is −∞, so upstream uses a fixed point just below
            else:
                half = 1 / (1 + math.exp((_half_log_snr(sigma[i]) + _half_log_snr(down)) / 2))
            half = to_float32(half)
            ratio = half / sigma[i]
            denoised_half = denoiser(ratio * x + (1 - ratio) * denoised, half)
            ratio = down / sigma[i]
            x = ratio * x + (1 - ratio) * denoised_half
            x = keep * x + renoise * source(sigma[i], sigma[i + 1], x)
        _done(callback, i, total)
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """DPM++ 2M SDE (η = 1, midpoint) in the flow's half-log-SNR λ = log((1−σ)/σ), as ComfyUI since
    2025-06-17. A first sigma ≥ 1 (λ = −∞) is moved to percent_to_sigma(1e-4) and evaluated there; the
    start latent is not re-noised for it. The last step returns D."""
    source = _required(noise, "dpmpp_2m_sde")
    sigma = _sigma_values(sigmas)
    if sigma[0] >= 1.0:
        if shift is None:
            raise ValueError("dpmpp_2m_sde needs the model's shift to offset a first sigma of 1")
        sigma[0] = to_float32(percent_to_sigma(1e-4, shift=shift, rule="current"))
    x = x.to(torch.float32)
    total = len(sigma) - 1
    previous: torch.Tensor | None = None
    h_previous = 0.0
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        if sigma[i + 1] == 0:
            x = denoised
        else:
            h = _half_log_snr(sigma[i + 1]) - _half_log_snr(sigma[i])
            alpha = 1 - sigma[i + 1]
            gain = -math.expm1(-2 * h)  # 1 − e^{−(1+η)h}
            x = (sigma[i + 1] / sigma[i]) * math.exp(-h) * x + alpha * gain * denoised
            if previous is not None:
                x = x + 0.5 * alpha * gain * (h / h_previous) * (denoised - previous)
            x = x + source(sigma[i], sigma[i + 1], x) * (sigma[i + 1] * math.sqrt(gain))
            h_previous = h
        previous = denoised
        _done(callback, i, total)
    return x


_LMS_ORDER = 4


def _required(noise: NoiseSource | None, sampler: str) -> NoiseSource:
    if noise is None:
        raise ValueError(f"{sampler} is stochastic and needs a noise source (see noise_for)")
    return noise


def _half_log_snr(sigma: float) -> float:
    return math.log((1 - sigma) / sigma)


def _rf_ancestral(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """(σ_d, α_{i+1}/α_d, c) of the rectified-flow ancestral step with η = 1: deterministic down to σ_d,
    then scale by α_{i+1}/α_d and add c·z so the marginal at σ_{i+1} is right."""
    down = sigma_next * (1 + (sigma_next / sigma - 1))
    alpha_next, alpha_down = 1 - sigma_next, 1 - down
    renoise = math.sqrt(max(sigma_next**2 - down**2 * alpha_next**2 / alpha_down**2, 0.0))
    return down, alpha_next / alpha_down, renoise


def _dpm_2_step(
    denoiser: Denoiser, x: torch.Tensor, denoised: torch.Tensor, *, sigma: float, target: float
) -> torch.Tensor:
    slope = (x - denoised) / sigma
    if target == 0:
        return x + slope * (target - sigma)
    mid = to_float32(math.sqrt(sigma * target))  # the midpoint in log sigma
    x_mid = x + slope * (mid - sigma)
    return x + (x_mid - denoiser(x_mid, mid)) / mid * (target - sigma)


def _lms_coefficient(sigma: list[float], *, step: int, j: int, order: int) -> float:
    """∫ from σ_step to σ_step+1 of the Lagrange basis polynomial of node σ_{step−j} over the last
    `order` nodes, integrated exactly (upstream integrates numerically to 1e-4 relative)."""
    poly = [1.0]  # coefficients of τ^0, τ^1, …
    for k in range(order):
        if k == j:
            continue
        root, scale = sigma[step - k], sigma[step - j] - sigma[step - k]
        poly = [
            ((poly[n - 1] if n > 0 else 0.0) - root * (poly[n] if n < len(poly) else 0.0)) / scale
            for n in range(len(poly) + 1)
        ]
    start, end = sigma[step], sigma[step + 1]
    return sum(a * (end ** (n + 1) - start ** (n + 1)) / (n + 1) for n, a in enumerate(poly))


SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "ddim": sample_euler,  # upstream's ddim differs from euler only for inpainting noise
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpm_2": sample_dpm_2,
    "lms": sample_lms,
    "euler_ancestral": sample_euler_ancestral,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}

DISCARD_PENULTIMATE: frozenset[str] = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})

_ANCESTRAL: frozenset[str] = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"})
_BROWNIAN: frozenset[str] = frozenset({"dpmpp_2m_sde"})
STOCHASTIC: frozenset[str] = _ANCESTRAL | _BROWNIAN
"""Samplers that draw per-step noise, and so need a seed."""


def noise_for(sampler: str, *, seed: int, sigmas: torch.Tensor, like: torch.Tensor) -> NoiseSource | None:
    """The per-step noise source `sampler` needs for this request, or None for deterministic samplers.

    The Brownian tree spans the schedule's smallest non-zero sigma to its largest, taken before any
    sampler-internal offset of the first sigma.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(sorted(SAMPLERS))}")
    if sampler in _ANCESTRAL:
        return AncestralNoise(seed)
    if sampler in _BROWNIAN:
        positive = sigmas[sigmas > 0]
        return BrownianTreeNoise(seed, float(positive.min()), float(sigmas.max()), like)
    return None
