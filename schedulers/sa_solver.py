"""SA-Solver (Xue et al. 2023, "Stochastic Adams solver", arXiv 2309.05019) as ComfyUI runs it on a flow
model: a stochastic Adams predictor (order 3) and corrector (order 4) in data prediction over the half
log-SNR λ = log((1−σ)/σ), with noise (τ = 1) only while σ lies between percent_to_sigma(0.2) and
percent_to_sigma(0.8), and an ODE step (τ = 0) elsewhere. `sa_solver_pece` evaluates the model again
at each corrected state. First-sigma offset and final D as the other half-log-SNR samplers.

The Adams weights b_k = α_t·(1+τ²)·∫_{λ_s}^{λ_t} e^{(1+τ²)(λ−λ_t)} ℓ_k(λ) dλ of the Lagrange basis ℓ_k
through the last λ nodes come from upstream's construction: the exponential moments by integration by
parts, then a Vandermonde solve. Upstream does that in float32, where the Vandermonde system through
the offset first λ ≈ −10 is poorly conditioned; `scalar_dtype` keeps float32 by default for parity and
takes float64 only to check the formulas.
"""

from __future__ import annotations

import math

import torch

from schedulers.noise import NoiseSource
from schedulers.sigmas import percent_to_sigma
from schedulers.stepping import Denoiser, StepCallback, done, offset_first_sigma, required

_PREDICTOR_ORDER = 3
_CORRECTOR_ORDER = 4
_NOISY_FROM, _NOISY_TO = 0.2, 0.8  # progress percents between which τ = 1


def sample_sa_solver(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """SA-Solver, predictor-corrector with one evaluation per step (the corrector reuses it)."""
    return sa_solver(denoiser, x, sigmas, noise=noise, callback=callback, shift=shift, pece=False)


def sample_sa_solver_pece(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """SA-Solver in PECE mode: the model is evaluated again at every corrected state (2 per step)."""
    return sa_solver(denoiser, x, sigmas, noise=noise, callback=callback, shift=shift, pece=True)


def sa_solver(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None,
    callback: StepCallback | None,
    shift: float | None,
    pece: bool,
    scalar_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    name = "sa_solver_pece" if pece else "sa_solver"
    source = required(noise, name)
    if shift is None:
        raise ValueError(f"{name} needs the model's shift for its noise window")
    sigma = offset_first_sigma(sigmas, shift, name)
    x = x.to(torch.float32)
    total = len(sigma) - 1
    if total < 1:
        return x
    noisy_high = percent_to_sigma(_NOISY_FROM, shift=shift, rule="current")
    noisy_low = percent_to_sigma(_NOISY_TO, shift=shift, rule="current")
    table = torch.tensor(sigma, dtype=torch.float32)
    lambdas = (-torch.logit(table)).to(scalar_dtype)
    nodes = table.to(scalar_dtype)
    lower_order_to_end = sigma[-1] == 0

    predictions: list[torch.Tensor] = []  # the last model values, oldest first
    x_predicted = x
    h = torch.zeros((), dtype=scalar_dtype)
    tau = 0.0
    carried = torch.zeros_like(x)  # the predictor's noise, added again after the correction
    for i in range(total):
        denoised = denoiser(x_predicted, sigma[i])
        predictions = [*predictions, denoised][-max(_PREDICTOR_ORDER, _CORRECTOR_ORDER) :]
        predictor_order = min(_PREDICTOR_ORDER, len(predictions))
        final = sigma[i + 1] == 0
        corrector_order = 0 if i == 0 or (final and not pece) else min(_CORRECTOR_ORDER, len(predictions))
        if lower_order_to_end:
            predictor_order = min(predictor_order, total - 1 - i)
            corrector_order = min(corrector_order, total - i)

        if corrector_order == 0:
            x = x_predicted
        else:
            weights = _adams_weights(
                nodes[i], lambdas[i - corrector_order + 1 : i + 1], lambdas[i - 1], lambdas[i], tau
            )
            decay = nodes[i] / nodes[i - 1] * torch.exp(-(tau**2) * h)
            x = _weighted(decay, x, weights, predictions[-corrector_order:])
            if tau > 0:
                x = x + carried
            if pece:
                denoised = denoiser(x, sigma[i])
                predictions[-1] = denoised

        if final:
            x = denoised
        else:
            tau = 1.0 if noisy_high >= sigma[i + 1] >= noisy_low else 0.0
            weights = _adams_weights(
                nodes[i + 1], lambdas[i - predictor_order + 1 : i + 1], lambdas[i], lambdas[i + 1], tau
            )
            h = lambdas[i + 1] - lambdas[i]
            decay = nodes[i + 1] / nodes[i] * torch.exp(-(tau**2) * h)
            x_predicted = _weighted(decay, x, weights, predictions[-predictor_order:])
            if tau > 0:
                spread = nodes[i + 1] * (-2 * tau**2 * h).expm1().neg().sqrt()
                carried = source(sigma[i], sigma[i + 1], x) * spread.to(torch.float32)
                x_predicted = x_predicted + carried
        done(callback, i, total)
    return x


def _weighted(
    decay: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, values: list[torch.Tensor]
) -> torch.Tensor:
    """decay·x + Σ_k b_k·D_k, with the scalars cast to the state's float32."""
    out = decay.to(torch.float32) * x
    total = torch.zeros_like(x)
    for weight, value in zip(weights.to(torch.float32), values, strict=True):
        total = total + weight * value
    return out + total


def _adams_weights(
    sigma_next: torch.Tensor, nodes: torch.Tensor, lam_s: torch.Tensor, lam_t: torch.Tensor, tau: float
) -> torch.Tensor:
    """b_k for the Lagrange basis through `nodes` (oldest first), over [λ_s, λ_t], at stochasticity τ."""
    count = nodes.shape[0]
    dtype = nodes.dtype
    tau_mul = 1 + tau**2
    h = lam_t - lam_s
    powers = torch.arange(count, dtype=dtype)
    # J_p = (1+τ²)·e^{−(1+τ²)λ_t}·∫ e^{(1+τ²)λ} λ^p dλ = (λ_t^p − λ_s^p·e^{−(1+τ²)h}) − p/(1+τ²)·J_{p−1}
    boundary = lam_t**powers - lam_s**powers * (-tau_mul * h).exp()
    depth = powers.unsqueeze(1) - powers.unsqueeze(0)
    log_factorial = (powers + 1).lgamma()
    log_coefficient = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau > 0:
        log_coefficient = log_coefficient - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0).to(dtype)
    moments = (log_coefficient.exp() * signs).tril() @ boundary
    # Σ_k b_k λ_k^p = J_p for every p < count: the weights of the interpolating polynomial.
    lagrange: torch.Tensor = torch.linalg.solve(torch.vander(nodes, count, increasing=True).T, moments)
    return sigma_next * lam_t.exp() * lagrange
