"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927) in its noise-prediction form, as ComfyUI's `dpm_fast`
and `dpm_adaptive` run it: in t = −log σ (the VE form, even for flow models), from the schedule's
first sigma down to its smallest non-zero one, *not* to 0; the schedule itself only lends those two
ends (and, for dpm_fast, its length as the evaluation budget). Upstream returns the state at σ_min,
un-denoised, and so do we. Scalars are float32 tensor operations in upstream's order; both run with
η = 0 (upstream multiplies its noise by 0), so they are deterministic.
"""

from __future__ import annotations

import math

import torch

from schedulers.stepping import Denoiser, StepCallback, done, sigma_values

_F32 = torch.float32


class _Solver:
    """The DPM-Solver-1/2/3 steps over one model, counting evaluations for the progress callback."""

    def __init__(self, denoiser: Denoiser, callback: StepCallback | None, total: int) -> None:
        self.denoiser = denoiser
        self.callback = callback
        self.total = total
        self.evaluations = 0

    def eps(self, cache: dict[str, torch.Tensor], key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε = (x − D(x, σ))/σ at σ = e^{−t}, computed once per key and step."""
        if key not in cache:
            sigma = torch.exp(-t)
            cache[key] = (x - self.denoiser(x, float(sigma))) / sigma
            done(self.callback, self.evaluations, max(self.total, self.evaluations + 1))
            self.evaluations += 1
        return cache[key]

    def first_order(
        self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        h = t_next - t
        return x - torch.exp(-t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def second_order(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        t_next: torch.Tensor,
        cache: dict[str, torch.Tensor],
        r_1: float = 0.5,
    ) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s_1 = t + r_1 * h
        u_1 = x - torch.exp(-s_1) * (r_1 * h).expm1() * eps
        eps_1 = self.eps(cache, "eps_r1", u_1, s_1)
        sigma_next = torch.exp(-t_next)
        return x - sigma_next * h.expm1() * eps - sigma_next / (2 * r_1) * h.expm1() * (eps_1 - eps)

    def third_order(
        self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        r_1, r_2 = 1 / 3, 2 / 3
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s_1, s_2 = t + r_1 * h, t + r_2 * h
        u_1 = x - torch.exp(-s_1) * (r_1 * h).expm1() * eps
        eps_1 = self.eps(cache, "eps_r1", u_1, s_1)
        sigma_2 = torch.exp(-s_2)
        u_2 = (
            x
            - sigma_2 * (r_2 * h).expm1() * eps
            - sigma_2 * (r_2 / r_1) * ((r_2 * h).expm1() / (r_2 * h) - 1) * (eps_1 - eps)
        )
        eps_2 = self.eps(cache, "eps_r2", u_2, s_2)
        sigma_next = torch.exp(-t_next)
        return x - sigma_next * h.expm1() * eps - sigma_next / r_2 * (h.expm1() / h - 1) * (eps_2 - eps)


def _ends(sigmas: torch.Tensor) -> tuple[float, float] | None:
    """(σ_max, σ_min) as upstream's wrapper picks them: the first sigma and the last non-zero one."""
    sigma = sigma_values(sigmas)
    if len(sigma) <= 1:
        return None
    low = sigma[-1] if sigma[-1] != 0 else sigma[-2]
    return sigma[0], low


def sample_dpm_fast(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver-fast: the evaluation budget N = len(sigmas) − 1 spent as ⌊N/3⌋ third-order steps plus
    one of order N mod 3 (or, when 3 divides N, a second- and a first-order step at the end), on a grid
    uniform in t from σ_max to σ_min. Returns the state at σ_min."""
    x = x.to(torch.float32)
    ends = _ends(sigmas)
    if ends is None:
        return x
    budget = len(sigmas) - 1
    t_start, t_end = (-torch.tensor(value, dtype=_F32).log() for value in ends)
    steps = budget // 3 + 1
    grid = torch.linspace(float(t_start), float(t_end), steps + 1, dtype=_F32)
    orders = [3] * (steps - 2) + [2, 1] if budget % 3 == 0 else [3] * (steps - 1) + [budget % 3]
    solver = _Solver(denoiser, callback, budget)
    for i, order in enumerate(orders):
        cache: dict[str, torch.Tensor] = {}
        t, t_next = grid[i], grid[i + 1]
        if order == 1:
            x = solver.first_order(x, t, t_next, cache)
        elif order == 2:
            x = solver.second_order(x, t, t_next, cache)
        else:
            x = solver.third_order(x, t, t_next, cache)
    return x


_ADAPTIVE = {"rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "accept_safety": 0.81, "eps": 1e-8}


def sample_dpm_adaptive(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver-23 with adaptive steps (upstream's defaults: order 3, rtol 0.05, atol 0.0078, first step
    0.05 in t, an integral-only step controller with accept safety 0.81): each attempt compares the
    second- and third-order solutions (sharing their first two evaluations, 3 per attempt), scales the
    step by 1 + atan(e^{−1/3} − 1) of the scaled error e, and keeps the third-order one when accepted.
    Returns the state at σ_min; the number of evaluations depends on the model."""
    x = x.to(torch.float32)
    ends = _ends(sigmas)
    if ends is None:
        return x
    t_start, t_end = (-torch.tensor(value, dtype=_F32).log() for value in ends)
    atol, rtol = torch.tensor(_ADAPTIVE["atol"], dtype=_F32), torch.tensor(_ADAPTIVE["rtol"], dtype=_F32)
    solver = _Solver(denoiser, callback, len(sigmas) - 1)
    h = _ADAPTIVE["h_init"]
    order = 3
    inverse_errors: list[float] = []
    s = t_start
    x_previous = x
    while s < t_end - 1e-5:
        cache: dict[str, torch.Tensor] = {}
        t = torch.minimum(t_end, s + h)
        x_low = solver.second_order(x, s, t, cache, r_1=1 / 3)
        x_high = solver.third_order(x, s, t, cache)
        scale = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_previous.abs()))
        error = torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5
        # The step controller (PID with only the integral term): factor = (1/e)^{1/order}, limited.
        inverse = 1 / (float(error) + _ADAPTIVE["eps"])
        inverse_errors = [inverse, *inverse_errors[1:]] if inverse_errors else [inverse] * 3
        factor = inverse_errors[0] ** (1 / order) * inverse_errors[1] ** (-0.0) * inverse_errors[2] ** 0.0
        factor = 1 + math.atan(factor - 1)
        h *= factor
        if factor >= _ADAPTIVE["accept_safety"]:
            inverse_errors = [inverse_errors[0], inverse_errors[0], inverse_errors[1]]
            x_previous = x_low
            x = x_high
            s = t
    return x
