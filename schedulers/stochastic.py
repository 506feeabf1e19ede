"""Stochastic samplers of ComfyUI beyond the classic ancestral/SDE ones: LCM, DDPM, ER-SDE and SEEDS-2/3.

All draw their per-step noise from the ancestral stream (`AncestralNoise`). Where upstream's step
coefficients lose digits in float32 (DDPM's 1 − ᾱ near σ = 0, ER-SDE's λ = σ/(1−σ) near σ = 1), they
are computed here with the same float32 tensor operations, so that the rounding is upstream's.
"""

from __future__ import annotations

import torch

from schedulers.noise import NoiseSource
from schedulers.sigmas import to_float32
from schedulers.stepping import (
    Denoiser,
    StepCallback,
    done,
    offset_first_sigma,
    required,
    sigma_values,
)

_F32 = torch.float32


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=_F32)


def sample_lcm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """LCM: jump to D, then re-noise to the next sigma as the flow does, σ_{i+1}·z + (1 − σ_{i+1})·D."""
    source = required(noise, "lcm")
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        x = denoiser(x, sigma[i])
        if sigma[i + 1] > 0:
            x = sigma[i + 1] * source(sigma[i], sigma[i + 1], x) + (1.0 - sigma[i + 1]) * x
        done(callback, i, total)
    return x


def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDPM ancestral steps on the VP view of the sigma (ᾱ = 1/(1+σ²)), as upstream runs them for
    every model: the posterior mean from ε = (x − D)/σ plus the posterior noise, then back to the
    k-diffusion scale √(1+σ²). Coefficients in float32 tensor ops, as upstream."""
    source = required(noise, "ddpm")
    sigma = sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        now, nxt = _scalar(sigma[i]), _scalar(sigma[i + 1])
        eps = (x - denoised) / sigma[i]
        x_vp = x / torch.sqrt(1.0 + now**2.0)
        cumprod = 1 / (now * now + 1)
        cumprod_next = 1 / (nxt * nxt + 1)
        alpha = cumprod / cumprod_next
        x = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - cumprod).sqrt())
        if sigma[i + 1] > 0:
            spread = ((1 - alpha) * (1.0 - cumprod_next) / (1.0 - cumprod)).sqrt()
            x = x + spread * source(sigma[i], sigma[i + 1], x)
            x = x * torch.sqrt(1.0 + nxt**2.0)
        done(callback, i, total)
    return x


_ER_POINTS = 200
_ER_STAGES = 3


def _er_noise_scaler(value: torch.Tensor) -> torch.Tensor:
    return value * ((value**0.3).exp() + 10.0)


def sample_er_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """ER-SDE-Solver-3 (Cui et al. 2023, VP form) with upstream's noise scaler λ·(e^{λ^0.3} + 10), in
    λ = σ/(1−σ) for a flow model: a first-order step plus up to two Taylor terms from divided
    differences of D in λ, whose integrals are 200-point sums, then the SDE noise. A first sigma of 1
    is offset as for the other half-log-SNR samplers; the last step returns D. Float32 scalars."""
    source = required(noise, "er_sde")
    sigma = offset_first_sigma(sigmas, shift, "er_sde")
    x = x.to(torch.float32)
    total = len(sigma) - 1
    table = torch.tensor(sigma, dtype=_F32)
    lambdas = torch.logit(table).exp()  # e^{−λ_half} = σ/α (upstream negates twice: exact)
    points = torch.arange(0, float(_ER_POINTS), dtype=_F32)
    previous: torch.Tensor | None = None
    previous_slope: torch.Tensor | None = None
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        stages = min(_ER_STAGES, i + 1)
        if sigma[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = lambdas[i], lambdas[i + 1]
            alpha_s, alpha_t = table[i] / lam_s, table[i + 1] / lam_t
            ratio = _er_noise_scaler(lam_t) / _er_noise_scaler(lam_s)
            x = (alpha_t / alpha_s) * ratio * x + alpha_t * (1 - ratio) * denoised
            if stages >= 2:
                assert previous is not None
                dt = lam_t - lam_s
                step = -dt / _ER_POINTS
                positions = lam_t + points * step
                scaled = _er_noise_scaler(positions)
                integral = torch.sum(1 / scaled) * step
                slope = (denoised - previous) / (lam_s - lambdas[i - 1])
                x = x + alpha_t * (dt + integral * _er_noise_scaler(lam_t)) * slope
                if stages >= 3:
                    assert previous_slope is not None
                    integral_u = torch.sum((positions - lam_s) / scaled) * step
                    curvature = (slope - previous_slope) / ((lam_s - lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + integral_u * _er_noise_scaler(lam_t)) * curvature
                previous_slope = slope
            spread = (lam_t**2 - lam_s**2 * ratio**2).sqrt().nan_to_num(nan=0.0)
            x = x + alpha_t * source(sigma[i], sigma[i + 1], x) * spread
        previous = denoised
        done(callback, i, total)
    return x


def _half_log_snr32(sigma: float) -> torch.Tensor:
    return -torch.logit(_scalar(sigma))


def _sigma_of32(lam: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(-lam)


def _phi_1(h: torch.Tensor) -> torch.Tensor:
    """h·φ₁(h) = e^h − 1."""
    return torch.expm1(h)


def _phi_2(h: torch.Tensor) -> torch.Tensor:
    """h·φ₂(h) = (e^h − 1 − h)/h."""
    return (torch.expm1(h) - h) / h


def sample_seeds_2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """SEEDS-2 (Gonzalez et al. 2023; VP data prediction, η = 1, r = ½) in the flow's half-log-SNR:
    an exponential-integrator stage to the λ-midpoint with its share of the noise, then the full step
    with D at the midpoint, whose noise continues the first stage's. Two draws and two evaluations per
    step; first-sigma offset and final D as the other half-log-SNR samplers. Float32 scalars."""
    source = required(noise, "seeds_2")
    sigma = offset_first_sigma(sigmas, shift, "seeds_2")
    x = x.to(torch.float32)
    total = len(sigma) - 1
    r = 0.5
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        if sigma[i + 1] == 0:
            x = denoised
        else:
            now, nxt = _scalar(sigma[i]), _scalar(sigma[i + 1])
            lam_s, lam_t = _half_log_snr32(sigma[i]), _half_log_snr32(sigma[i + 1])
            h = lam_t - lam_s
            h_eta = h * 2.0
            lam_1 = torch.lerp(lam_s, lam_t, r)
            sigma_1 = _sigma_of32(lam_1)
            alpha_1 = sigma_1 * lam_1.exp()
            alpha_t = nxt * lam_t.exp()
            x_2 = sigma_1 / now * (-r * h).exp() * x - alpha_1 * _phi_1(-r * h_eta) * denoised
            mid = to_float32(float(sigma_1))
            sde = (-2 * r * h).expm1().neg().sqrt() * source(sigma[i], mid, x)
            x_2 = x_2 + sde * sigma_1
            denoised_2 = denoiser(x_2, mid)
            blended = torch.lerp(denoised, denoised_2, 1 / (2 * r))
            x = nxt / now * (-h).exp() * x - alpha_t * _phi_1(-h_eta) * blended
            segment = (r - 1) * h
            sde = sde * segment.exp() + segment.mul(2).expm1().neg().sqrt() * source(mid, sigma[i + 1], x)
            x = x + sde * nxt
        done(callback, i, total)
    return x


def sample_seeds_3(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """SEEDS-3 (η = 1, r₁ = ⅓, r₂ = ⅔) in the flow's half-log-SNR: stages at λ-fractions ⅓ and ⅔ and the
    full step, each with its share of one continued noise path (three draws, three evaluations per
    step); first-sigma offset and final D as the other half-log-SNR samplers. Float32 scalars."""
    source = required(noise, "seeds_3")
    sigma = offset_first_sigma(sigmas, shift, "seeds_3")
    x = x.to(torch.float32)
    total = len(sigma) - 1
    r_1, r_2 = 1.0 / 3, 2.0 / 3
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        if sigma[i + 1] == 0:
            x = denoised
        else:
            now, nxt = _scalar(sigma[i]), _scalar(sigma[i + 1])
            lam_s, lam_t = _half_log_snr32(sigma[i]), _half_log_snr32(sigma[i + 1])
            h = lam_t - lam_s
            h_eta = h * 2.0
            lam_1, lam_2 = torch.lerp(lam_s, lam_t, r_1), torch.lerp(lam_s, lam_t, r_2)
            sigma_1, sigma_2 = _sigma_of32(lam_1), _sigma_of32(lam_2)
            alpha_1, alpha_2 = sigma_1 * lam_1.exp(), sigma_2 * lam_2.exp()
            alpha_t = nxt * lam_t.exp()
            mid_1, mid_2 = to_float32(float(sigma_1)), to_float32(float(sigma_2))

            x_2 = sigma_1 / now * (-r_1 * h).exp() * x - alpha_1 * _phi_1(-r_1 * h_eta) * denoised
            sde = (-2 * r_1 * h).expm1().neg().sqrt() * source(sigma[i], mid_1, x)
            x_2 = x_2 + sde * sigma_1
            denoised_2 = denoiser(x_2, mid_1)

            a3_2 = r_2 / r_1 * _phi_2(-r_2 * h_eta)
            a3_1 = _phi_1(-r_2 * h_eta) - a3_2
            x_3 = sigma_2 / now * (-r_2 * h).exp() * x - alpha_2 * (a3_1 * denoised + a3_2 * denoised_2)
            segment = (r_1 - r_2) * h
            sde = sde * segment.exp() + segment.mul(2).expm1().neg().sqrt() * source(mid_1, mid_2, x)
            x_3 = x_3 + sde * sigma_2
            denoised_3 = denoiser(x_3, mid_2)

            b_3 = _phi_2(-h_eta) / r_2
            b_1 = _phi_1(-h_eta) - b_3
            x = nxt / now * (-h).exp() * x - alpha_t * (b_1 * denoised + b_3 * denoised_3)
            segment = (r_2 - 1) * h
            sde = sde * segment.exp() + segment.mul(2).expm1().neg().sqrt() * source(mid_2, sigma[i + 1], x)
            x = x + sde * nxt
        done(callback, i, total)
    return x
