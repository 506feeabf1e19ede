"""One pure function per ComfyUI sampler, in sigma space for a rectified-flow (CONST) model.

Every sampler integrates dx/dσ = (x − D(x, σ))/σ over a float32 state; they differ only in the
discretisation. Step coefficients are computed in Python floats from the float32 schedule values.
"""

from __future__ import annotations

import inspect
import math

import torch

from schedulers import cfg_pp, dpm_solver, multistep, sa_solver, stochastic
from schedulers.noise import AncestralNoise, BrownianTreeNoise, NoiseSource
from schedulers.sigmas import to_float32
from schedulers.stepping import Denoiser, Sampler, StepCallback
from schedulers.stepping import done as _done
from schedulers.stepping import half_log_snr as _half_log_snr
from schedulers.stepping import offset_first_sigma as _offset_first_sigma
from schedulers.stepping import required as _required
from schedulers.stepping import sigma_values as _sigma_values


def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
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
    callback: StepCallback | None = None,
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
    callback: StepCallback | None = None,
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
    callback: StepCallback | None = None,
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
    callback: StepCallback | None = None,
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
    return _dpmpp_2m_sde(denoiser, x, sigmas, noise=noise, callback=callback, shift=shift, heun=False)


def sample_dpmpp_2m_sde_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """DPM++ 2M SDE with the Heun correction: as `sample_dpmpp_2m_sde`, but the second-order term
    weighs the first difference of D by 1 − (1 − e^{−2h})/(2h) instead of the midpoint's ½(1 − e^{−2h})."""
    return _dpmpp_2m_sde(denoiser, x, sigmas, noise=noise, callback=callback, shift=shift, heun=True)


def _dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None,
    callback: StepCallback | None,
    shift: float | None,
    heun: bool,
) -> torch.Tensor:
    name = "dpmpp_2m_sde_heun" if heun else "dpmpp_2m_sde"
    source = _required(noise, name)
    sigma = _offset_first_sigma(sigmas, shift, name)
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
                weight = (gain / (-2 * h) + 1) if heun else 0.5 * gain
                x = x + alpha * weight * (h / h_previous) * (denoised - previous)
            x = x + source(sigma[i], sigma[i + 1], x) * (sigma[i + 1] * math.sqrt(gain))
            h_previous = h
        previous = denoised
        _done(callback, i, total)
    return x


def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """DPM++ SDE (η = 1, r = 1/2) in the flow's half-log-SNR λ = log((1−σ)/σ), as ComfyUI since 2025-06.

    Each step evaluates D at σ_i and at the λ-midpoint σ_m between σ_i and σ_{i+1}; both stages are
    ancestral steps in λ (the VE ancestral split of e^{−λ}, then Brownian noise queried over
    (σ_i, σ_target)), and the second stage uses only the midpoint prediction. A first sigma ≥ 1 is moved
    to percent_to_sigma(1e-4) as in dpmpp_2m_sde; the last step returns D. 2 NFE per step, 1 on the last.

    The step scalars (λ, the midpoint sigma, α, the ancestral split) are float32 tensor operations in
    upstream's order: at the offset first sigma e^{−λ} is ~3·10⁴, σ_down² = σ_to² − σ_up² cancels, and
    float32 gives a different (often zero) σ_down than float64 would (up to 8e-4 in the state).
    """
    source = _required(noise, "dpmpp_sde")
    sigma = _offset_first_sigma(sigmas, shift, "dpmpp_sde")
    x = x.to(torch.float32)
    total = len(sigma) - 1
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        if sigma[i + 1] == 0:
            x = denoised
        else:
            now, nxt = (torch.tensor(value, dtype=torch.float32) for value in (sigma[i], sigma[i + 1]))
            lam, lam_next = -torch.logit(now), -torch.logit(nxt)
            lam_mid = lam + 0.5 * (lam_next - lam)
            mid_sigma = torch.sigmoid(-lam_mid)
            alpha, alpha_mid, alpha_next = now * lam.exp(), mid_sigma * lam_mid.exp(), nxt * lam_next.exp()
            mid = float(mid_sigma)
            x_mid = _snr_ancestral_stage(
                x, denoised, lam=(lam, lam_mid), alpha=(alpha, alpha_mid), span=(sigma[i], mid), noise=source
            )
            x = _snr_ancestral_stage(
                x,
                denoiser(x_mid, mid),
                lam=(lam, lam_next),
                alpha=(alpha, alpha_next),
                span=(sigma[i], sigma[i + 1]),
                noise=source,
            )
        _done(callback, i, total)
    return x


def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """DPM++ 3M SDE (η = 1) in the flow's half-log-SNR, as ComfyUI since 2025-06.

    The exponential-integrator step of dpmpp_2m_sde with a correction from up to two previous
    predictions: none on the first step, a first difference on the second, then first and second
    divided differences (φ₂, φ₃ weights). First-sigma offset and final x = D as in dpmpp_2m_sde.
    """
    source = _required(noise, "dpmpp_3m_sde")
    sigma = _offset_first_sigma(sigmas, shift, "dpmpp_3m_sde")
    x = x.to(torch.float32)
    total = len(sigma) - 1
    history: list[tuple[torch.Tensor, float]] = []  # (D, h) of the previous steps, newest first
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        if sigma[i + 1] == 0:
            x = denoised
        else:
            h = _half_log_snr(sigma[i + 1]) - _half_log_snr(sigma[i])
            alpha = 1 - sigma[i + 1]
            decay = -math.expm1(-2 * h)  # 1 − e^{−(1+η)h}
            x = (sigma[i + 1] / sigma[i]) * math.exp(-h) * x + alpha * decay * denoised
            phi_2 = math.expm1(-2 * h) / (2 * h) + 1
            if len(history) >= 2:
                (d_1, h_1), (d_2, h_2) = history[0], history[1]
                r_0, r_1 = h_1 / h, h_2 / h
                first_0 = (denoised - d_1) / r_0
                first_1 = (d_1 - d_2) / r_1
                slope = first_0 + (first_0 - first_1) * (r_0 / (r_0 + r_1))
                curvature = (first_0 - first_1) / (r_0 + r_1)
                phi_3 = phi_2 / (2 * h) - 0.5
                x = x + (alpha * phi_2) * slope - (alpha * phi_3) * curvature
            elif history:
                d_1, h_1 = history[0]
                x = x + (alpha * phi_2) * ((denoised - d_1) / (h_1 / h))
            x = x + source(sigma[i], sigma[i + 1], x) * (sigma[i + 1] * math.sqrt(decay))
            history = [(denoised, h), *history][:2]
        _done(callback, i, total)
    return x


def sample_uni_pc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """UniPC, B(h) = h variant ("bh1"), multistep data prediction: ComfyUI's `uni_pc` (docs/sampling.md §4).

    ComfyUI runs its UniPC on a VP view of the k-diffusion sigma even for flow models: α = 1/√(1+σ²),
    σ_vp = σ·α, λ = log(α/σ_vp); the state is x/√(1+σ²) and the data prediction is D at the unscaled
    state. A final sigma of 0 becomes 0.001 (never evaluated), the order is min(3, steps − 1) with lower
    orders at the start and end, each step's corrector evaluation is reused as the next step's model
    value (N NFE), and the output is divided by α(0.001). Those VP quantities are computed with float32
    ops as upstream does (at σ = 0.001 that gives σ_vp = 2⁻¹⁰, not 0.001: 2 % off, and reproduced).

    Two upstream quirks are reproduced on purpose: one step (order 0) returns the scaled start state
    untouched, and because upstream writes the 0.001 into the caller's sigma tensor, KSampler's final
    x/(1 − σ_last) divides by 0.999; that division is applied here since our caller sees σ_last = 0.

    Faithfulness (Gaussian toy, tests/schedulers/test_uni_pc_deis.py): the arithmetic is upstream's,
    float32 scalars in the same order. With float64 step weights it agrees with an independent float64
    reference to ≤ 4e-6 (all schedules, N ≤ 100). Upstream's float32 weights themselves drift from that
    float64 math by up to 4.5e-4 (N = 25, cfg 5) and 5.7e-3 (N = 100, cfg 5), because its φ_k recursion
    cancels when the λ-step is small; we reproduce that rounding, so parity with a GPU run of upstream is
    limited by how its expm1 rounds (about 1e-4). Error vs the exact ODE at cfg 1: 0.52 / 0.105 / 0.028 at
    N = 10 / 25 / 50 (like dpm_2: the discard rule leaves one long first-order last step).
    """
    return _uni_pc(denoiser, x, sigmas, callback=callback, bh2=False)


def sample_uni_pc_bh2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """UniPC with B(h) = e^h − 1 ("bh2"); otherwise identical to `sample_uni_pc`."""
    return _uni_pc(denoiser, x, sigmas, callback=callback, bh2=True)


def sample_deis(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DEIS, tab mode, order up to 3: ComfyUI's `deis` (docs/sampling.md §4).

    A multistep method on the slope d = (x − D)/σ: each σ is mapped to the time t of a VP-SDE whose
    β-schedule is fixed by EDM's σ ∈ [0.002, 80] (ε = 1e-3), d is extrapolated by the Lagrange polynomial
    in t through the last up-to-3 nodes, and each basis polynomial is integrated against dσ/dt with
    upstream's 10 000-point rule (sum over linspace(t_i, t_{i+1}, 10 000) times (t_{i+1} − t_i)/10 000, not
    an exact quadrature). First step Euler; a step to σ = 0 is Euler, i.e. returns D. The coefficients
    are computed with float32 ops as upstream does. Measured on the Gaussian toy: ≤ 3.2e-6 from an
    independent float64 reference that rounds only the σ → t map to float32 (≤ 2.6e-5 if it does not:
    1 + σ² in float32 moves t at σ ≈ 0.003); error vs the exact ODE at cfg 1: 0.19 / 0.031 / 0.0094 at
    N = 10 / 25 / 50.
    """
    sigma = _sigma_values(sigmas)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    times, beta_0, beta_1 = _deis_vp_times(sigmas)
    slopes: list[torch.Tensor] = []  # newest first
    for i in range(total):
        denoised = denoiser(x, sigma[i])
        slope = (x - denoised) / sigma[i]
        slopes = [slope, *slopes][:_DEIS_ORDER]
        order = len(slopes) if sigma[i + 1] > 0 else 1
        if order == 1:
            x = x + (sigma[i + 1] - sigma[i]) * slope
        else:
            weights = _deis_weights(times, beta_0, beta_1, step=i, order=order)
            step = x
            for weight, past in zip(weights, slopes, strict=True):
                step = step + weight * past
            x = step
        _done(callback, i, total)
    return x


_LMS_ORDER = 4


def _snr_ancestral_stage(
    x: torch.Tensor,
    denoised: torch.Tensor,
    *,
    lam: tuple[torch.Tensor, torch.Tensor],
    alpha: tuple[torch.Tensor, torch.Tensor],
    span: tuple[float, float],
    noise: NoiseSource,
) -> torch.Tensor:
    """One η = 1 ancestral stage of DPM++ SDE from λ to λ_to (λ = log((1−σ)/σ)), float32 scalars.

    The VE ancestral split of e^{−λ} → e^{−λ_to} gives σ_down and σ_up; the data-prediction exponential
    integrator goes to λ' = −log σ_down (span h' = λ' − λ) and the noise α_to·σ_up·z restores the
    marginal. A σ_down of 0 makes h' infinite: x ← α_to·D + α_to·σ_up·z, as upstream.
    """
    (lam_from, lam_to), (alpha_from, alpha_to) = lam, alpha
    sigma_from, sigma_to = (-lam_from).exp(), (-lam_to).exp()
    up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    down = (sigma_to**2 - up**2) ** 0.5
    h = down.log().neg() - lam_from
    x = (alpha_to / alpha_from) * (-h).exp() * x - alpha_to * (-h).expm1() * denoised
    # The Brownian increment is queried over (σ_from, σ_target), the schedule sigmas of this stage.
    return x + alpha_to * noise(span[0], span[1], x) * up


def _vp_view(sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α, σ_vp, λ) of the VP process with the same signal-to-noise ratio as the VE sigma σ, evaluated
    like upstream's UniPC: float32 ops through log α = ½·log(1/(σ²+1)) and 1 − α² = 1 − e^{2 log α}."""
    value = torch.tensor(sigma, dtype=torch.float32)
    log_alpha = 0.5 * torch.log(1 / (value * value + 1))
    noise_var = 1.0 - torch.exp(2.0 * log_alpha)
    return torch.exp(log_alpha), torch.sqrt(noise_var), log_alpha - 0.5 * torch.log(noise_var)


_UNI_PC_END = 0.001  # a final sigma of 0 is replaced by this (λ would be infinite)


def _uni_pc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None,
    bh2: bool,
    scalar_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The UniPC loop. `scalar_dtype` is the precision of the step coefficients after the VP view: float32
    as upstream (whose φ_k recursion loses most digits when h is small, e.g. near σ = 1), float64 only
    to check the formulas against the float64 reference."""
    nodes = _sigma_values(sigmas)
    total = len(nodes) - 1
    ends_at_zero = nodes[-1] == 0
    if ends_at_zero:
        nodes[-1] = to_float32(_UNI_PC_END)
    first = torch.tensor(nodes[0], dtype=torch.float32)
    x = x.to(torch.float32) / torch.sqrt(1.0 + first**2.0)
    order = min(3, total - 1)

    def predict(state: torch.Tensor, node: float) -> torch.Tensor:
        # D at the k-diffusion state; upstream's ε round trip through the VP view is the identity.
        scale = (torch.tensor(node, dtype=torch.float32) ** 2 + 1.0) ** 0.5
        return denoiser(state * scale, node)

    if total >= 1:
        history = [(nodes[0], predict(x, nodes[0]))]  # (σ, data prediction), oldest first
        _done(callback, 0, total)
        for step in range(1, total if order >= 1 else 1):
            targets = [step, step + 1] if step == total - 1 else [step]
            for target in targets:
                step_order = target if target < order else min(order, total + 1 - target)
                corrected = target < total
                x, model_value = _uni_pc_update(
                    denoiser=predict,
                    x=x,
                    history=history,
                    target=nodes[target],
                    order=step_order,
                    corrector=corrected,
                    bh2=bh2,
                    dtype=scalar_dtype,
                )
                if model_value is not None:
                    history = [*history, (nodes[target], model_value)][-max(order, 1) :]
            _done(callback, step, total)
    x = x / _vp_view(nodes[-1])[0]
    if ends_at_zero:
        # Upstream wrote 0.001 into the caller's sigmas, so KSampler's inverse noise scaling divides
        # by 1 − 0.001 instead of 1 − 0; our caller sees the real 0 and will not.
        x = x / (1.0 - torch.tensor(nodes[-1], dtype=torch.float32))
    return x


def _uni_pc_update(
    *,
    denoiser: Denoiser,
    x: torch.Tensor,
    history: list[tuple[float, torch.Tensor]],
    target: float,
    order: int,
    corrector: bool,
    bh2: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One UniPC step to `target` of the given order: the UniP predictor, then (if `corrector`) one
    model evaluation at the predicted state and the UniC corrector. Returns (x, that evaluation)."""
    alpha_t, std_t, lam_t = (value.to(dtype) for value in _vp_view(target))
    sigma_0, model_0 = history[-1]
    _, std_0, lam_0 = (value.to(dtype) for value in _vp_view(sigma_0))
    h = lam_t - lam_0
    ratios: list[torch.Tensor] = []
    differences: list[torch.Tensor] = []  # scaled first differences of the model values, newest first
    for back in range(1, order):
        sigma_k, model_k = history[-(back + 1)]
        ratio = (_vp_view(sigma_k)[2].to(dtype) - lam_0) / h
        ratios.append(ratio)
        differences.append((model_k - model_0) / ratio)
    nodes = torch.stack([*ratios, torch.tensor(1.0, dtype=dtype)])
    hh = -h  # data prediction integrates in −λ
    h_phi_1 = torch.expm1(hh)  # h·φ₁(h) = e^h − 1
    b_h = torch.expm1(hh) if bh2 else hh
    rows, rhs = [], []
    phi_k = h_phi_1 / hh - 1
    factorial = 1
    for k in range(1, order + 1):
        rows.append(nodes ** (k - 1))
        rhs.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1 / factorial
    matrix, vector = torch.stack(rows), torch.stack(rhs)
    linear = (std_t / std_0) * x - (alpha_t * h_phi_1) * model_0
    predicted = linear
    if differences:
        # second order uses the fixed weight ½ upstream, not the solved one
        weights_p = (
            torch.tensor([0.5], dtype=dtype)
            if order == 2
            else torch.linalg.solve(matrix[:-1, :-1], vector[:-1])
        )
        predicted = linear - (alpha_t * b_h) * _combine(weights_p, differences)
    if not corrector:
        return predicted, None
    weights_c = torch.tensor([0.5], dtype=dtype) if order == 1 else torch.linalg.solve(matrix, vector)
    model_t = denoiser(predicted, target)
    correction = weights_c[-1] * (model_t - model_0)
    if differences:
        correction = _combine(weights_c[:-1], differences) + correction
    return linear - (alpha_t * b_h) * correction, model_t


def _combine(weights: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
    total = weights[0] * terms[0]
    for weight, term in zip(weights[1:], terms[1:], strict=True):
        total = total + weight * term
    return total


_DEIS_ORDER = 3
_DEIS_QUADRATURE_POINTS = 10_000
_DEIS_EDM_SIGMA_MIN, _DEIS_EDM_SIGMA_MAX, _DEIS_EPSILON = 0.002, 80.0, 1e-3


def _deis_vp_times(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VP-SDE times t of the sigmas, and the schedule's β₀, β₁, in float32 as upstream computes them.

    The linear-β VP process has σ(t)² = exp(½β_d t² + β_min t) − 1, with β_d, β_min chosen so that
    σ(ε) = 0.002 and σ(1) = 80 (EDM's range); t(σ) inverts that quadratic.
    """
    f32 = torch.float32
    low = torch.log(torch.tensor(_DEIS_EDM_SIGMA_MIN, dtype=f32) ** 2 + 1)
    high = torch.log(torch.tensor(_DEIS_EDM_SIGMA_MAX, dtype=f32) ** 2 + 1)
    beta_d = 2 * (low / _DEIS_EPSILON - high) / (_DEIS_EPSILON - 1)
    beta_min = high - 0.5 * beta_d
    values = sigmas.detach().to(device="cpu", dtype=f32)
    times = ((beta_min**2 + 2 * beta_d * torch.log(values**2 + 1)).sqrt() - beta_min) / beta_d
    return times, beta_min, beta_d + beta_min


def _deis_weights(
    times: torch.Tensor, beta_0: torch.Tensor, beta_1: torch.Tensor, *, step: int, order: int
) -> list[float]:
    """∫ dσ/dt · ℓ_j(t) dt over [t_step, t_step+1] for the Lagrange basis ℓ_j of nodes t_step, t_step−1, …
    (j = 0 is the newest), by upstream's rule: a plain sum over `linspace` points times Δt/N."""
    start, end = times[step], times[step + 1]
    taus = torch.linspace(float(start), float(end), _DEIS_QUADRATURE_POINTS, dtype=torch.float32)
    width = (end - start) / _DEIS_QUADRATURE_POINTS
    alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)  # ᾱ(t)
    log_alpha_slope = -taus * (beta_1 - beta_0) - beta_0
    sigma_slope = -0.5 * log_alpha_slope / torch.sqrt(alpha * (1 - alpha))  # dσ/dt with σ² = 1/ᾱ − 1
    nodes = [times[step - k] for k in range(order)]
    weights = []
    for j in range(order):
        basis = torch.ones_like(taus)
        for k in range(order):
            if k != j:
                basis = basis * ((taus - nodes[k]) / (nodes[j] - nodes[k]))
        weights.append(float(torch.sum(sigma_slope * basis) * width))
    return weights


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
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
    "deis": sample_deis,
    # CFG++ (schedulers/cfg_pp.py): they take D_u from the guidance layer.
    "euler_cfg_pp": cfg_pp.sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": cfg_pp.sample_euler_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": cfg_pp.sample_dpmpp_2m_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": cfg_pp.sample_dpmpp_2s_ancestral_cfg_pp,
    # schedulers/multistep.py
    "heunpp2": multistep.sample_heunpp2,
    "ipndm": multistep.sample_ipndm,
    "ipndm_v": multistep.sample_ipndm_v,
    "res_multistep": multistep.sample_res_multistep,
    "res_multistep_cfg_pp": multistep.sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": multistep.sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": multistep.sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": multistep.sample_gradient_estimation,
    "gradient_estimation_cfg_pp": multistep.sample_gradient_estimation_cfg_pp,
    # schedulers/stochastic.py
    "lcm": stochastic.sample_lcm,
    "ddpm": stochastic.sample_ddpm,
    "er_sde": stochastic.sample_er_sde,
    "seeds_2": stochastic.sample_seeds_2,
    "seeds_3": stochastic.sample_seeds_3,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    # schedulers/dpm_solver.py: they end at the smallest non-zero sigma, as upstream.
    "dpm_fast": dpm_solver.sample_dpm_fast,
    "dpm_adaptive": dpm_solver.sample_dpm_adaptive,
    # schedulers/sa_solver.py
    "sa_solver": sa_solver.sample_sa_solver,
    "sa_solver_pece": sa_solver.sample_sa_solver_pece,
    # The _gpu twins run the same math; only their Brownian tree lives on the state's device.
    "dpmpp_sde_gpu": sample_dpmpp_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun_gpu": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde,
}

DISCARD_PENULTIMATE: frozenset[str] = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})

CFG_PP: frozenset[str] = frozenset(name for name in SAMPLERS if name.endswith("_cfg_pp"))
"""Samplers that use the unconditional prediction (the guidance layer's `with_uncond`)."""

_ANCESTRAL: frozenset[str] = frozenset(
    {
        *("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"),
        *("euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp"),
        *("res_multistep_ancestral", "res_multistep_ancestral_cfg_pp"),
        *("lcm", "ddpm", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"),
    }
)
_BROWNIAN: frozenset[str] = frozenset({"dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_sde", "dpmpp_3m_sde"})
_BROWNIAN_ON_DEVICE: frozenset[str] = frozenset(f"{name}_gpu" for name in _BROWNIAN)
STOCHASTIC: frozenset[str] = _ANCESTRAL | _BROWNIAN | _BROWNIAN_ON_DEVICE
"""Samplers that draw per-step noise, and so need a seed."""


_KEYWORDS: dict[str, frozenset[str]] = {
    name: frozenset(inspect.signature(function).parameters) - {"denoiser", "x", "sigmas"}
    for name, function in SAMPLERS.items()
}
"""The keyword arguments each sampler takes (`callback`, and `noise` / `shift` where it uses them)."""


def run(
    sampler: str,
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    shift: float | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run the registered `sampler`, handing it only the keyword arguments it takes."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(sorted(SAMPLERS))}")
    offered = {"noise": noise, "shift": shift, "callback": callback}
    return SAMPLERS[sampler](
        denoiser, x, sigmas, **{key: value for key, value in offered.items() if key in _KEYWORDS[sampler]}
    )


def noise_for(sampler: str, *, seed: int, sigmas: torch.Tensor, like: torch.Tensor) -> NoiseSource | None:
    """The per-step noise source `sampler` needs for this request, or None for deterministic samplers.

    The Brownian tree spans the schedule's smallest non-zero sigma to its largest, taken before any
    sampler-internal offset of the first sigma; the `_gpu` samplers build it on `like`'s device.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(sorted(SAMPLERS))}")
    if sampler in _ANCESTRAL:
        return AncestralNoise(seed)
    if sampler in _BROWNIAN or sampler in _BROWNIAN_ON_DEVICE:
        positive = sigmas[sigmas > 0]
        return BrownianTreeNoise(
            seed,
            float(positive.min()),
            float(sigmas.max()),
            like,
            on_device=sampler in _BROWNIAN_ON_DEVICE,
        )
    return None
