"""Independent float64 numpy re-derivation of the sampling spec (schedules, samplers, negative window, CFG)
plus the Gaussian toy denoiser. Written from the spec's formulas, not from `schedulers/`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import beta as beta_distribution

Array = np.ndarray
RefDenoiser = Callable[[Array, float], Array]


# --- §1 / §2: schedules ----------------------------------------------------------------------------


def shifted(t: Array, a: float) -> Array:
    return a * t / (1 + (a - 1) * t)


def table(a: float) -> Array:
    return shifted(np.arange(1, 1001) / 1000.0, a)


def percent_to_sigma(p: float, a: float, rule: str) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    return float(shifted(np.array(1 - p), a)) if rule == "current" else 1 - p


def schedule(name: str, n: int, a: float) -> Array:
    tab = table(a)
    lo, hi = tab[0], tab[-1]
    if name == "simple":
        body = [tab[999 - int(x * (1000 / n))] for x in range(n)]
    elif name == "normal":
        body = list(shifted(np.linspace(1000 * hi, 1000 * lo, n) / 1000, a))
    elif name == "sgm_uniform":
        body = list(shifted(np.linspace(1000 * hi, 1000 * lo, n + 1)[:-1] / 1000, a))
    elif name == "karras":
        ramp = np.arange(n) / (n - 1) if n > 1 else np.zeros(1)
        body = list((hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7)
    elif name == "exponential":
        body = list(np.exp(np.linspace(math.log(hi), math.log(lo), n)))
    elif name == "beta":
        idx = np.rint(beta_distribution.ppf(1 - np.arange(n) / n, 0.6, 0.6) * 999).astype(int)
        keep = [int(k) for j, k in enumerate(idx) if j == 0 or k != idx[j - 1]]
        body = [tab[k] for k in keep]
    elif name == "ddim_uniform":
        ss = max(1000 // n, 1)
        body = [tab[k] for k in range(1, 1000, ss)][::-1]
    else:
        raise ValueError(name)
    return np.array([*body, 0.0])


def sigmas(name: str, steps: int, a: float, denoise: float = 1.0, discard: bool = False) -> Array:
    def full(n: int) -> Array:
        if not discard:
            return schedule(name, n, a)
        s = schedule(name, n + 1, a)
        return np.concatenate([s[:-2], s[-1:]])

    if denoise > 0.9999:
        return full(steps)
    return full(int(steps / denoise))[-(steps + 1) :]


# --- §3: samplers (float64) ------------------------------------------------------------------------


def euler(model: RefDenoiser, x: Array, s: Sequence[float]) -> Array:
    for i in range(len(s) - 1):
        r = s[i + 1] / s[i]
        x = r * x + (1 - r) * model(x, s[i])
    return x


def heun(model: RefDenoiser, x: Array, s: Sequence[float]) -> Array:
    for i in range(len(s) - 1):
        d = (x - model(x, s[i])) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + dt * d
            continue
        x_pred = x + dt * d
        d2 = (x_pred - model(x_pred, s[i + 1])) / s[i + 1]
        x = x + dt * (d + d2) / 2
    return x


def _dpm2_step(model: RefDenoiser, x: Array, denoised: Array, s_from: float, s_to: float) -> Array:
    d = (x - denoised) / s_from
    if s_to == 0:
        return x + (s_to - s_from) * d
    mid = math.sqrt(s_from * s_to)
    x_mid = x + (mid - s_from) * d
    return x + (s_to - s_from) * (x_mid - model(x_mid, mid)) / mid


def dpm_2(model: RefDenoiser, x: Array, s: Sequence[float]) -> Array:
    for i in range(len(s) - 1):
        x = _dpm2_step(model, x, model(x, s[i]), s[i], s[i + 1])
    return x


def lms(model: RefDenoiser, x: Array, s: Sequence[float], order: int = 4) -> Array:
    history: list[Array] = []
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        history = [(x - denoised) / s[i], *history][:order]
        if s[i + 1] == 0:
            x = denoised
            continue
        m = min(i + 1, order)
        for j in range(m):
            poly = np.polynomial.Polynomial([1.0])
            for k in range(m):
                if k != j:
                    poly = poly * np.polynomial.Polynomial([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
            antiderivative = poly.integ()
            x = x + (antiderivative(s[i + 1]) - antiderivative(s[i])) * history[j]
    return x


def dpmpp_2m(model: RefDenoiser, x: Array, s: Sequence[float]) -> Array:
    old = None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        r = s[i + 1] / s[i]
        if old is None or s[i + 1] == 0:
            x = r * x + (1 - r) * denoised
        else:
            h, h_last = math.log(s[i] / s[i + 1]), math.log(s[i - 1] / s[i])
            rho = h_last / h
            x = r * x + (1 - r) * ((1 + 1 / (2 * rho)) * denoised - old / (2 * rho))
        old = denoised
    return x


def _rf_down(s_from: float, s_to: float) -> tuple[float, float]:
    """σ_d and the re-noise coefficient c of the RF ancestral step (η = 1)."""
    down = s_to * s_to / s_from
    c = math.sqrt(s_to**2 - down**2 * (1 - s_to) ** 2 / (1 - down) ** 2)
    return down, c


def euler_ancestral_rf(model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array]) -> Array:
    k = 0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
            continue
        down, c = _rf_down(s[i], s[i + 1])
        x = (down / s[i]) * x + (1 - down / s[i]) * denoised
        x = (1 - s[i + 1]) / (1 - down) * x + c * noise[k]
        k += 1
    return x


def dpm_2_ancestral_rf(model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array]) -> Array:
    k = 0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = x + (0 - s[i]) * (x - denoised) / s[i]
            continue
        down, c = _rf_down(s[i], s[i + 1])
        x = _dpm2_step(model, x, denoised, s[i], down)
        x = (1 - s[i + 1]) / (1 - down) * x + c * noise[k]
        k += 1
    return x


def dpmpp_2s_ancestral_rf(model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array]) -> Array:
    def lam(v: float) -> float:
        return math.log((1 - v) / v)

    k = 0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = x + (0 - s[i]) * (x - denoised) / s[i]
            continue
        down, c = _rf_down(s[i], s[i + 1])
        half = 0.9999 if s[i] == 1.0 else 1 / (1 + math.exp((lam(s[i]) + lam(down)) / 2))
        u = (half / s[i]) * x + (1 - half / s[i]) * denoised
        x = (down / s[i]) * x + (1 - down / s[i]) * model(u, half)
        x = (1 - s[i + 1]) / (1 - down) * x + c * noise[k]
        k += 1
    return x


def dpmpp_2m_sde(
    model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array], *, first_sigma: float
) -> Array:
    """Current CONST form; `first_sigma` replaces s[0] when s[0] ≥ 1 (the first-sigma offset)."""
    s = list(s)
    if s[0] >= 1:
        s[0] = first_sigma

    def lam(v: float) -> float:
        return math.log((1 - v) / v)

    old, h_last = None, None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
            continue
        h = lam(s[i + 1]) - lam(s[i])
        alpha = 1 - s[i + 1]
        x = (s[i + 1] / s[i]) * math.exp(-h) * x + alpha * (1 - math.exp(-2 * h)) * denoised
        if old is not None:
            assert h_last is not None
            x = x + 0.5 * alpha * (1 - math.exp(-2 * h)) * (h / h_last) * (denoised - old)
        x = x + s[i + 1] * math.sqrt(1 - math.exp(-2 * h)) * noise[i]
        old, h_last = denoised, h
    return x


# --- §4: negative window and CFG -------------------------------------------------------------------


def windows(start: float, stop: float, a: float, wiring: str, rule: str) -> dict[str, tuple[float, float]]:
    real_until = 0.1 if wiring == "a" else start
    return {
        "negative": (percent_to_sigma(0, a, rule), percent_to_sigma(real_until, a, rule)),
        "zero": (percent_to_sigma(start, a, rule), percent_to_sigma(stop, a, rule)),
    }


def active_negatives(sigma: float, ranges: dict[str, tuple[float, float]]) -> tuple[str, ...]:
    f = np.float32
    return tuple(n for n, (hi, lo) in ranges.items() if f(lo) <= f(sigma) <= f(hi))


class Toy:
    """Gaussian data per channel: x0 ~ N(μ_c(cond), s_c²), with the analytic posterior mean as D."""

    def __init__(self, channels: int = 4, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.scale = np.exp(rng.normal(0, 0.5, channels))
        self.means = {name: rng.normal(0, 0.3, channels) for name in ("positive", "negative", "zero")}

    def denoised(self, x: Array, sigma: float, name: str) -> Array:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mu, s2 = self.means[name].reshape(shape), (self.scale**2).reshape(shape)
        gain = (1 - sigma) * s2 / ((1 - sigma) ** 2 * s2 + sigma**2)
        return mu + gain * (x - (1 - sigma) * mu)

    def guided(
        self, *, cfg: float, ranges: dict[str, tuple[float, float]], log: list | None = None
    ) -> RefDenoiser:
        def model(x: Array, sigma: float) -> Array:
            names = () if math.isclose(cfg, 1) else active_negatives(sigma, ranges)
            if log is not None:
                log.append((sigma, names))
            cond = self.denoised(x, sigma, "positive")
            if math.isclose(cfg, 1):
                return cond
            uncond = sum((self.denoised(x, sigma, n) for n in names), np.zeros_like(x)) / max(len(names), 1)
            return uncond + cfg * (cond - uncond)

        return model
