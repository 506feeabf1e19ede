"""Flow time shift, the ComfyUI sigma schedules for a discrete-flow model, and `denoise` slicing.

Schedules are computed with torch float32 ops in the same order as ComfyUI so that the float32 values
(and therefore ties against the negative-prompt thresholds) come out identical.
"""

from __future__ import annotations

import math
from typing import overload

import torch

SCHEDULES: tuple[str, ...] = (
    "simple",
    "normal",
    "sgm_uniform",
    "karras",
    "exponential",
    "beta",
    "ddim_uniform",
    "linear_quadratic",
    "kl_optimal",
)

_TABLE_SIZE = 1000
_KARRAS_RHO = 7.0
_BETA_ALPHA = 0.6
_BETA_BETA = 0.6
_LINEAR_QUADRATIC_THRESHOLD = 0.025


@overload
def time_shift(t: float, shift: float) -> float: ...
@overload
def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor: ...
def time_shift(t: float | torch.Tensor, shift: float) -> float | torch.Tensor:
    """σ(t) = a·t / (1 + (a−1)·t); exactly the identity for a = 1 (no rounding introduced)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1.0) * t)


def to_float32(value: float) -> float:
    """Round a Python float to the nearest float32, the precision upstream keeps every sigma in."""
    return float(torch.tensor(value, dtype=torch.float32))


def sigma_table(shift: float) -> torch.Tensor:
    """The model's 1000 float32 sigmas: tab[k] = σ((k+1)/1000), so tab[0] = sigma_min and tab[-1] = 1."""
    # Upstream stores t as a model timestep (·1000) and divides it back; keep that round trip so every
    # entry is bit-identical.
    timesteps = torch.arange(1, _TABLE_SIZE + 1, dtype=torch.float32) / _TABLE_SIZE * _TABLE_SIZE
    return time_shift(timesteps / _TABLE_SIZE, shift)


def percent_to_sigma(percent: float, *, shift: float, rule: str) -> float:
    """Sampling progress (0 = pure noise, 1 = done) → sigma threshold.

    rule "current" shifts 1 − p (ComfyUI since 2024-12-05); "legacy" uses 1 − p unshifted.
    """
    if rule not in ("current", "legacy"):
        raise ValueError(f"unknown percent rule {rule!r}: expected 'current' or 'legacy'")
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    if rule == "legacy":
        return 1.0 - percent
    return time_shift(1.0 - percent, shift)


def sigmas_for(
    schedule: str,
    *,
    steps: int,
    shift: float,
    denoise: float = 1.0,
    discard_penultimate: bool = False,
) -> torch.Tensor:
    """The float32 sigma schedule KSampler would use, ending in 0.

    Most schedules give steps+1 values; `beta` may give fewer (duplicates dropped) and `ddim_uniform`
    may give a different count. With denoise < 1 the schedule of int(steps/denoise) steps is computed
    and its last steps+1 values are kept.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if denoise > 0.9999:
        return _with_discard(schedule, steps=steps, shift=shift, discard_penultimate=discard_penultimate)
    if denoise <= 0.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    full = _with_discard(
        schedule, steps=int(steps / denoise), shift=shift, discard_penultimate=discard_penultimate
    )
    return full[-(steps + 1) :]


def _with_discard(schedule: str, *, steps: int, shift: float, discard_penultimate: bool) -> torch.Tensor:
    if not discard_penultimate:
        return _schedule(schedule, steps=steps, shift=shift)
    # DPM2-like samplers waste their last interval, so KSampler plans one extra step and removes the
    # second-to-last sigma to keep the requested count.
    longer = _schedule(schedule, steps=steps + 1, shift=shift)
    return torch.cat([longer[:-2], longer[-1:]])


def _schedule(schedule: str, *, steps: int, shift: float) -> torch.Tensor:
    table = sigma_table(shift)
    sigma_min, sigma_max = table[0], table[-1]
    zero = torch.zeros(1, dtype=torch.float32)
    if schedule == "simple":
        stride = _TABLE_SIZE / steps
        picked = [float(table[_TABLE_SIZE - 1 - int(x * stride)]) for x in range(steps)]
        return torch.tensor([*picked, 0.0], dtype=torch.float32)
    if schedule in ("normal", "sgm_uniform"):
        # Both go through model timesteps (1000σ) of the *shifted* extremes and shift again.
        start, end = sigma_max * _TABLE_SIZE, sigma_min * _TABLE_SIZE
        if schedule == "normal":
            timesteps = torch.linspace(start, end, steps)
        else:
            timesteps = torch.linspace(start, end, steps + 1)[:-1]
        return torch.cat([time_shift(timesteps / _TABLE_SIZE, shift), zero])
    if schedule == "karras":
        ramp = torch.linspace(0, 1, steps)
        min_inv_rho = float(sigma_min) ** (1 / _KARRAS_RHO)
        max_inv_rho = float(sigma_max) ** (1 / _KARRAS_RHO)
        return torch.cat([(max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** _KARRAS_RHO, zero])
    if schedule == "exponential":
        logs = torch.linspace(math.log(float(sigma_max)), math.log(float(sigma_min)), steps)
        return torch.cat([logs.exp(), zero])
    if schedule == "beta":
        return _beta_schedule(table, steps=steps)
    if schedule == "linear_quadratic":
        return _linear_quadratic_schedule(steps=steps) * sigma_max
    if schedule == "kl_optimal":
        return _kl_optimal_schedule(steps=steps, sigma_min=float(sigma_min), sigma_max=float(sigma_max))
    return _ddim_uniform_schedule(table, steps=steps)


def _linear_quadratic_schedule(*, steps: int) -> torch.Tensor:
    """Mochi's schedule: 1 − s with s linear from 0 up to the 0.025 threshold over the first half of
    the steps, then quadratic up to 1 (the model's shift plays no part). Python floats, as upstream."""
    if steps == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float32)
    threshold = _LINEAR_QUADRATIC_THRESHOLD
    linear_steps = steps // 2
    quadratic_steps = steps - linear_steps
    excess = linear_steps - threshold * steps
    quadratic = excess / (linear_steps * quadratic_steps**2)
    linear = threshold / linear_steps - 2 * excess / quadratic_steps**2
    constant = quadratic * linear_steps**2
    progress = [i * threshold / linear_steps for i in range(linear_steps)]
    progress += [quadratic * i**2 + linear * i + constant for i in range(linear_steps, steps)]
    return torch.tensor([1.0 - p for p in [*progress, 1.0]], dtype=torch.float32)


def _kl_optimal_schedule(*, steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal schedule (AYS paper): σ = tan of a linear ramp from atan(σ_max) to atan(σ_min), in
    float32 ops as upstream. Upstream divides the ramp by steps − 1, so one step gives NaN there; here
    one step is [σ_max, 0]."""
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float32)
    ramp = torch.arange(steps, dtype=torch.float32).div_(steps - 1)
    body = (ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)).tan_()
    return torch.cat([body, torch.zeros(1, dtype=torch.float32)])


def _beta_schedule(table: torch.Tensor, *, steps: int) -> torch.Tensor:
    from scipy.stats import beta as beta_distribution  # lazy: scipy is only needed for this schedule

    # j·(1/N), not j/N: the upstream grid is numpy's linspace, which multiplies by the step.
    progress = [1.0 - j * (1.0 / steps) for j in range(steps)]
    quantiles = beta_distribution.ppf(progress, _BETA_ALPHA, _BETA_BETA)
    picked: list[float] = []
    last_index = -1
    for quantile in quantiles:
        index = round(float(quantile) * (_TABLE_SIZE - 1))  # round half to even, like numpy.rint
        if index != last_index:
            picked.append(float(table[index]))
        last_index = index
    return torch.tensor([*picked, 0.0], dtype=torch.float32)


def _ddim_uniform_schedule(table: torch.Tensor, *, steps: int) -> torch.Tensor:
    stride = max(_TABLE_SIZE // steps, 1)
    picked = [float(table[index]) for index in range(1, _TABLE_SIZE, stride)]
    return torch.tensor([*reversed(picked), 0.0], dtype=torch.float32)
