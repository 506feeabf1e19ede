"""Independent float64 numpy re-derivation of docs/sampling.md (schedules, samplers, negative window, CFG)
plus the Gaussian toy denoiser. Written from those formulas, not from `schedulers/`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import beta as beta_distribution

Array = np.ndarray
RefDenoiser = Callable[[Array, float], Array]


# --- docs/sampling.md §1–§3: schedules ----------------------------------------------------------------------


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
    elif name == "linear_quadratic":
        # 1 − s: s rises linearly by 0.025/(n//2) per step for n//2 steps, then along the parabola
        # through (n//2, 0.025) with that slope which reaches 1 at step n.
        if n == 1:
            return np.array([1.0, 0.0])
        m = n // 2
        slope = 0.025 / m
        # s(i) = 0.025 + slope·(i − m) + c·(i − m)² with s(n) = 1
        c = (1 - 0.025 - slope * (n - m)) / (n - m) ** 2
        body = [1 - (i * slope if i < m else 0.025 + slope * (i - m) + c * (i - m) ** 2) for i in range(n)]
    elif name == "kl_optimal":
        if n == 1:
            body = [hi]
        else:
            ramp = np.arange(n) / (n - 1)
            body = list(np.tan(ramp * math.atan(lo) + (1 - ramp) * math.atan(hi)))
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


# --- docs/sampling.md §4: samplers (float64) ----------------------------------------------------------------


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


def _offset_first(s: Sequence[float], first_sigma: float) -> list[float]:
    """The SDE samplers' first-sigma offset: a schedule starting at σ ≥ 1 starts at `first_sigma`."""
    s = list(s)
    if s[0] >= 1:
        s[0] = first_sigma
    return s


def dpmpp_2m_sde(
    model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array], *, first_sigma: float
) -> Array:
    """Current CONST form; `first_sigma` replaces s[0] when s[0] ≥ 1 (the first-sigma offset)."""
    s = _offset_first(s, first_sigma)

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


def _half_log_snr(v: float) -> float:
    return math.log((1 - v) / v)


def _ve_ancestral(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """(σ_down, σ_up) of the classic VE ancestral split with η = 1."""
    up = min(sigma_to, math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def _sde_stage(x: Array, d: Array, s_from: float, s_to: float, lam_to: float, z: Array) -> Array:
    lam_s = _half_log_snr(s_from)
    down, up = _ve_ancestral(math.exp(-lam_s), math.exp(-lam_to))
    h_ = -math.log(down) - lam_s
    a_s, a_to = 1 - s_from, 1 - s_to
    return (a_to / a_s) * math.exp(-h_) * x - a_to * math.expm1(-h_) * d + a_to * up * z


def _sde_stage32(
    x: Array, d: Array, lam_s: np.float32, lam_to: np.float32, a_s: np.float32, a_to: np.float32, z: Array
) -> Array:
    """`_sde_stage` with every scalar in numpy float32, as upstream's tensor arithmetic rounds it."""
    f = np.float32
    e_s, e_to = np.exp(-lam_s), np.exp(-lam_to)
    up = min(e_to, np.sqrt(e_to * e_to * (e_s * e_s - e_to * e_to) / (e_s * e_s)))
    down = np.sqrt(e_to * e_to - up * up)
    with np.errstate(divide="ignore"):
        h_ = -np.log(down) - lam_s  # σ_down = 0 → h' = ∞ → e^{−h'} = 0
    keep = float((a_to / a_s) * np.exp(-h_))
    gain = float(-a_to * np.expm1(-h_))
    return keep * x + gain * d + float(a_to) * float(up) * z * f(1)


def dpmpp_sde(
    model: RefDenoiser,
    x: Array,
    s: Sequence[float],
    noise: Sequence[Array],
    *,
    first_sigma: float,
    float32: bool = False,
) -> Array:
    """DPM++ SDE, current CONST form (η = 1, r = ½), with the VE ancestral split applied to e^{−λ}.

    Noise is consumed in call order: the midpoint stage, then the full stage of each step. float32
    computes the step scalars (λ, σ_m, α, the split) in float32 as upstream does; at the offset first
    sigma e^{−λ} ≈ 3·10⁴ and σ_down² = σ_to² − σ_up² cancels, so float64 moves the state by up to ~1e-3."""
    s = _offset_first(s, first_sigma)
    draws = iter(noise)
    f = np.float32
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
            continue
        if float32:
            sf, st = f(s[i]), f(s[i + 1])
            lam_s, lam_t = -np.log(sf / (f(1) - sf)), -np.log(st / (f(1) - st))
            lam_m = lam_s + f(0.5) * (lam_t - lam_s)
            sm = f(1) / (f(1) + np.exp(lam_m))
            a_s, a_m, a_t = sf * np.exp(lam_s), sm * np.exp(lam_m), st * np.exp(lam_t)
            x_m = _sde_stage32(x, denoised, lam_s, lam_m, a_s, a_m, next(draws))
            x = _sde_stage32(x, model(x_m, float(sm)), lam_s, lam_t, a_s, a_t, next(draws))
            continue
        lam_s, lam_t = _half_log_snr(s[i]), _half_log_snr(s[i + 1])
        lam_m = lam_s + 0.5 * (lam_t - lam_s)
        s_m = float(np.float32(1 / (1 + math.exp(lam_m))))  # the model sees a float32 sigma

        x_m = _sde_stage(x, denoised, s[i], s_m, lam_m, next(draws))
        x = _sde_stage(x, model(x_m, s_m), s[i], s[i + 1], lam_t, next(draws))
    return x


def dpmpp_3m_sde(
    model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array], *, first_sigma: float
) -> Array:
    """DPM++ 3M SDE, current CONST form (η = 1)."""
    s = _offset_first(s, first_sigma)
    past: list[tuple[Array, float]] = []
    draws = iter(noise)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
            continue
        h = _half_log_snr(s[i + 1]) - _half_log_snr(s[i])
        he = 2 * h
        a_t = 1 - s[i + 1]
        x = s[i + 1] / s[i] * math.exp(-h) * x + a_t * (1 - math.exp(-he)) * denoised
        phi2 = (math.exp(-he) - 1) / he + 1
        if len(past) >= 2:
            (d1, h1), (d2, h2) = past[-1], past[-2]
            r0, r1 = h1 / h, h2 / h
            g0, g1 = (denoised - d1) / r0, (d1 - d2) / r1
            phi3 = phi2 / he - 0.5
            x = x + a_t * phi2 * (g0 + (g0 - g1) * r0 / (r0 + r1)) - a_t * phi3 * (g0 - g1) / (r0 + r1)
        elif past:
            d1, h1 = past[-1]
            x = x + a_t * phi2 * (denoised - d1) * h / h1
        x = x + s[i + 1] * math.sqrt(1 - math.exp(-2 * h)) * next(draws)
        past.append((denoised, h))
    return x


def vp_view(sigma: float, float32: bool) -> tuple[float, float, float]:
    """(α, σ_vp, λ) of the VP process with the SNR of VE sigma σ: α = 1/√(1+σ²), σ_vp = σα, λ = −log σ.

    float32=True evaluates them the way upstream's UniPC does, in float32 through 1 − e^{2 log α}
    (which matters at σ = 0.001: σ_vp comes out as 2⁻¹⁰)."""
    if not float32:
        alpha = 1 / math.sqrt(1 + sigma * sigma)
        return alpha, sigma * alpha, -math.log(sigma)
    f = np.float32
    v = f(sigma)
    log_alpha = f(0.5) * np.log(f(1) / (v * v + f(1)))
    var = f(1) - np.exp(f(2) * log_alpha)
    return float(np.exp(log_alpha)), float(np.sqrt(var)), float(log_alpha - f(0.5) * np.log(var))


def _phi(k: int, z: float) -> float:
    """φ_k(z) = (e^z − Σ_{j<k} z^j/j!) / z^k."""
    return (math.expm1(z) - sum(z**j / math.factorial(j) for j in range(1, k))) / z**k


def uni_pc(
    model: RefDenoiser,
    x: Array,
    s: Sequence[float],
    *,
    bh2: bool = False,
    vp: Callable[[float], tuple[float, float, float]] | None = None,
) -> Array:
    """ComfyUI's uni_pc (UniPC-B(h), data prediction, multistep) on the VP view of the VE sigmas.

    `vp` maps σ to (α, σ_vp, λ); by default the float32 emulation of `vp_view`. Upstream evaluates it in
    float32 where 1 − e^{2 log α} keeps only a few digits at small σ, so a one-ulp difference between
    numpy's and torch's float32 exp moves λ by up to ~1e-4 there: a test that wants 1e-5 agreement must
    pass the torch evaluation in."""
    n = len(s) - 1
    t = list(s)
    zero_end = t[-1] == 0
    if zero_end:
        t[-1] = float(np.float32(0.001))
    order = min(3, n - 1)

    if vp is None:

        def vp(v: float) -> tuple[float, float, float]:
            return vp_view(v, True)

    def data(xu: Array, v: float) -> Array:
        return model(xu * math.sqrt(1 + v * v), v)

    xu = x / math.sqrt(1 + t[0] ** 2)
    nodes, values = [t[0]], [data(xu, t[0])]
    for k in range(1, n + 1) if order >= 1 else ():
        p = k if k < order else min(order, n + 1 - k)
        a_t, sd_t, l_t = vp(t[k])
        _, sd_0, l_0 = vp(nodes[-1])
        m0 = values[-1]
        h = l_t - l_0
        r = [(vp(nodes[-1 - j])[2] - l_0) / h for j in range(1, p)]
        diffs = [(values[-1 - j] - m0) / r[j - 1] for j in range(1, p)]
        hh = -h
        b_h = math.expm1(hh) if bh2 else hh
        rk = np.array([*r, 1.0])
        big_r = np.array([rk**i for i in range(p)])
        b = np.array([math.factorial(i) * hh * _phi(i + 1, hh) / b_h for i in range(1, p + 1)])
        x_lin = (sd_t / sd_0) * xu - a_t * math.expm1(hh) * m0
        x_pred = x_lin
        if diffs:
            rho_p = [0.5] if p == 2 else list(np.linalg.solve(big_r[:-1, :-1], b[:-1]))
            x_pred = x_lin - a_t * b_h * sum(w * d for w, d in zip(rho_p, diffs, strict=True))
        if k == n:
            xu = x_pred
            break
        rho_c = [0.5] if p == 1 else list(np.linalg.solve(big_r, b))
        m_t = data(x_pred, t[k])
        xu = x_lin - a_t * b_h * (
            sum((w * d for w, d in zip(rho_c[:-1], diffs, strict=True)), np.zeros_like(xu))
            + rho_c[-1] * (m_t - m0)
        )
        nodes, values = [*nodes, t[k]][-order:], [*values, m_t][-order:]
    out = xu / vp(t[-1])[0]
    return out / (1 - t[-1]) if zero_end else out


def deis(
    model: RefDenoiser,
    x: Array,
    s: Sequence[float],
    *,
    max_order: int = 3,
    points: int = 10_000,
    float32_times: bool = True,
) -> Array:
    """ComfyUI's deis (tab): Lagrange extrapolation of d in VP time t, weights ∫ dσ/dt ℓ_j dt by a
    `points`-point sum over linspace(t_i, t_i+1) times Δt/points.

    float32_times evaluates the σ → t map in float32 as upstream does (1 + σ² rounds to float32, which
    moves t by up to ~0.5 % at σ ≈ 0.003); the rest is float64."""
    if float32_times:
        f32 = np.float32
        log_lo, log_hi = np.log(f32(0.002) ** 2 + f32(1)), np.log(f32(80.0) ** 2 + f32(1))
        bd = f32(2) * (log_lo / f32(1e-3) - log_hi) / f32(1e-3 - 1)
        bm = log_hi - f32(0.5) * bd
        t = [float((np.sqrt(bm**2 + f32(2) * bd * np.log(f32(v) ** 2 + f32(1))) - bm) / bd) for v in s]
        beta_d, beta_min = float(bd), float(bm)
    else:
        beta_d = 2 * (math.log1p(0.002**2) / 1e-3 - math.log1p(80.0**2)) / (1e-3 - 1)
        beta_min = math.log1p(80.0**2) - beta_d / 2
        t = [(math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(v * v)) - beta_min) / beta_d for v in s]

    def dsigma_dt(tau: Array) -> Array:
        growth = np.exp(beta_d * tau**2 / 2 + beta_min * tau)
        return (beta_d * tau + beta_min) * growth / (2 * np.sqrt(growth - 1))

    slopes: list[Array] = []
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        slopes.insert(0, (x - denoised) / s[i])
        del slopes[max_order:]
        m = len(slopes) if s[i + 1] > 0 else 1
        if m == 1:
            x = x + (s[i + 1] - s[i]) * slopes[0]
            continue
        taus = np.linspace(t[i], t[i + 1], points)
        f = dsigma_dt(taus)
        ts = [t[i - k] for k in range(m)]
        for j in range(m):
            ell = np.prod([(taus - ts[k]) / (ts[j] - ts[k]) for k in range(m) if k != j], axis=0)
            x = x + float(np.sum(f * ell) * (t[i + 1] - t[i]) / points) * slopes[j]
    return x


# --- docs/sampling.md §5: negative window and CFG -----------------------------------------------------------


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

    def guided_split(
        self, *, cfg: float, ranges: dict[str, tuple[float, float]]
    ) -> Callable[[Array, float], tuple[Array, Array]]:
        """(D, D_u) as the CFG++ samplers see them: the negatives are evaluated even at cfg 1."""

        def model(x: Array, sigma: float) -> tuple[Array, Array]:
            names = active_negatives(sigma, ranges)
            cond = self.denoised(x, sigma, "positive")
            uncond = sum((self.denoised(x, sigma, n) for n in names), np.zeros_like(x)) / max(len(names), 1)
            return uncond + cfg * (cond - uncond), uncond

        return model


# --- issue 15: the rest of ComfyUI's samplers (float64 unless a float32 emulation is asked for) ---------

SplitDenoiser = Callable[[Array, float], tuple[Array, Array]]


def _f32(v: float) -> float:
    return float(np.float32(v))


def euler_cfg_pp(split: SplitDenoiser, x: Array, s: Sequence[float]) -> Array:
    """x_{i+1} = α_{i+1}·D + σ_{i+1}·(x − α_i·D_u)/σ_i, α = 1 − σ (the flow's signal scale)."""
    for i in range(len(s) - 1):
        d, u = split(x, s[i])
        x = d if s[i + 1] == 0 else (1 - s[i + 1]) * d + s[i + 1] * (x - (1 - s[i]) * u) / s[i]
    return x


def euler_ancestral_cfg_pp(
    split: SplitDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array]
) -> Array:
    """VE ancestral split of the VP-scaled sigmas ς = σ/α; at σ = 1 (ς = ∞) all of ς_next is noise."""
    draws = iter(noise)
    for i in range(len(s) - 1):
        d, u = split(x, s[i])
        if s[i + 1] == 0:
            x = d
            continue
        a, a_next = 1 - s[i], 1 - s[i + 1]
        ve_next = s[i + 1] / a_next
        down, up = (0.0, ve_next) if a == 0 else _ve_ancestral(s[i] / a, ve_next)
        x = a_next * d + a_next * down * (x - a * u) / s[i] + a_next * up * next(draws)
    return x


def dpmpp_2m_cfg_pp(split: SplitDenoiser, x: Array, s: Sequence[float]) -> Array:
    old_u = None
    for i in range(len(s) - 1):
        d, u = split(x, s[i])
        if s[i + 1] == 0:
            x = d
        else:
            h = math.log(s[i] / s[i + 1])
            step = -math.exp(-h) * u
            if old_u is not None:
                rho = math.log(s[i - 1] / s[i]) / h
                step = step - math.expm1(-h) / (2 * rho) * (d - old_u)
            x = d + step + math.exp(-h) * x
        old_u = u
    return x


def dpmpp_2s_ancestral_cfg_pp(
    split: SplitDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array]
) -> Array:
    """VE form; the full step's CFG++ shift uses the uncond of the half-step evaluation."""
    draws = iter(noise)
    for i in range(len(s) - 1):
        d, u = split(x, s[i])
        down, up = _ve_ancestral(s[i], s[i + 1])
        if down == 0:
            x = d
        else:
            h = math.log(s[i] / down)
            half = _f32(math.sqrt(s[i] * down))
            x_half = (half / s[i]) * (x + d - u) - math.expm1(-h / 2) * d
            d_half, u_half = split(x_half, half)
            x = (down / s[i]) * (x + d - u_half) - math.expm1(-h) * d_half
        if s[i + 1] > 0:
            x = x + up * next(draws)
    return x


def heunpp2(model: RefDenoiser, x: Array, s: Sequence[float]) -> Array:
    n = len(s) - 1
    for i in range(n):
        d = (x - model(x, s[i])) / s[i]
        dt = s[i + 1] - s[i]
        if i + 1 == n:
            x = x + dt * d
            continue
        x2 = x + dt * d
        d2 = (x2 - model(x2, s[i + 1])) / s[i + 1]
        if i + 2 == n:
            w2 = s[i + 1] / (2 * s[0])
            x = x + dt * ((1 - w2) * d + w2 * d2)
            continue
        x3 = x2 + (s[i + 2] - s[i + 1]) * d2
        d3 = (x3 - model(x3, s[i + 2])) / s[i + 2]
        w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
        x = x + dt * ((1 - w2 - w3) * d + w2 * d2 + w3 * d3)
    return x


_AB_FIXED = {
    1: [1.0],
    2: [1.5, -0.5],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


def _ipndm_v_weights(s: Sequence[float], i: int, m: int) -> list[float]:
    """The variable-step iPNDM weights of diff-solvers (Zhou et al.'s iPNDM-v) that upstream adopts,
    newest slope first, from the current gap h and the past gaps h₁, h₂, h₃. Order 2 is the exact
    variable-step Adams–Bashforth rule and order 3 reduces to AB3 for equal steps; beyond that they are
    not AB (order 4 at equal steps leads with 57/24, not 55/24): upstream's formula, kept as is."""
    h = [s[i + 1] - s[i]] + [s[i - k] - s[i - k - 1] for k in range(m - 1)]  # h, h₁, h₂, h₃
    w = [1 + h[0] / (2 * h[1]), -h[0] / (2 * h[1])]
    if m == 2:
        return w
    t1 = 0.5 - h[0] ** 2 / (6 * h[1] * (h[1] + h[2]))
    w = [w[0] + t1, w[1] - t1 * (h[1] + h[2]) / h[2], t1 * h[1] / h[2]]
    if m == 3:
        return w
    g = (0.5 - h[0] / (6 * (h[0] + h[1]))) + (1 - h[0] / (2 * (h[0] + h[1]))) * h[0] / (6 * sum(h[:3]))
    t2 = g * h[0] * (h[0] + h[1]) * sum(h[:3]) / (h[1] * (h[1] + h[2]) * sum(h[1:4]))
    q = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    return [
        w[0] + t2,
        w[1] - (1 + h[1] / h[2] + q) * t2,
        w[2] + (h[1] / h[2] + q * (h[2] + h[3]) / h[3]) * t2,
        -t2 * q * h[1] / h[2],
    ]


def ipndm(model: RefDenoiser, x: Array, s: Sequence[float], *, variable: bool = False) -> Array:
    """Adams–Bashforth on the slope, order min(4, i+1): the equal-step weights, or iPNDM-v's."""
    slopes: list[Array] = []
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        slopes.insert(0, (x - denoised) / s[i])
        del slopes[4:]
        if s[i + 1] == 0:
            x = denoised
            continue
        m = len(slopes)
        weights = _ipndm_v_weights(s, i, m) if variable and m > 1 else _AB_FIXED[m]
        x = x + (s[i + 1] - s[i]) * sum(w * g for w, g in zip(weights, slopes, strict=True))
    return x


def adams_bashforth_weights(s: Sequence[float], i: int, m: int) -> list[float]:
    """The exact variable-step Adams–Bashforth weights (Lagrange basis integrated over the step)."""
    dt = s[i + 1] - s[i]
    weights = []
    for j in range(m):
        poly = np.polynomial.Polynomial([1.0])
        for k in range(m):
            if k != j:
                poly = poly * np.polynomial.Polynomial([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
        anti = poly.integ()
        weights.append((anti(s[i + 1]) - anti(s[i])) / dt)
    return weights


def res_multistep(
    split: SplitDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array], *, eta: float, cfg_pp: bool
) -> Array:
    """RES-2M in λ = −log σ towards the VE ancestral σ_down; `split` gives (D, D_u)."""
    draws = iter(noise)
    old, old_down = None, None
    for i in range(len(s) - 1):
        d, u = split(x, s[i])
        if not cfg_pp:
            u = d
        down, up = _ve_ancestral(s[i], s[i + 1]) if eta else (s[i + 1], 0.0)
        if down == 0 or old is None:
            x = d + (x - u) * down / s[i]  # Euler to σ_down along the (uncond) slope
        else:
            assert old_down is not None  # set with `old`
            h = math.log(s[i] / down)
            c2 = math.log(old_down / s[i - 1]) / h
            phi1 = -math.expm1(-h) / h
            phi2 = (phi1 - 1) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            if cfg_pp:
                x = x + d - u
            x = math.exp(-h) * x + h * (b1 * u + b2 * old)
        if s[i + 1] > 0 and up > 0:
            x = x + up * next(draws)
        old, old_down = u, down
    return x


def gradient_estimation(split: SplitDenoiser, x: Array, s: Sequence[float], *, cfg_pp: bool) -> Array:
    old = None
    for i in range(len(s) - 1):
        d, u = split(x, s[i])
        slope = (x - (u if cfg_pp else d)) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = d
        else:
            x = d + s[i + 1] * slope if cfg_pp else x + dt * slope
            if old is not None:
                x = x + (slope - old) * dt  # (γ − 1) with γ = 2
        old = slope
    return x


def lcm(model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array]) -> Array:
    draws = iter(noise)
    for i in range(len(s) - 1):
        x = model(x, s[i])
        if s[i + 1] > 0:
            x = s[i + 1] * next(draws) + (1 - s[i + 1]) * x
    return x


def ddpm(model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array], *, float32: bool) -> Array:
    """DDPM posterior steps on the VP view ᾱ = 1/(1+σ²). float32 evaluates the scalar coefficients in
    float32 as upstream (1 − ᾱ keeps few digits at small σ); the state stays float64."""
    f = np.float32 if float32 else float
    draws = iter(noise)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        eps = (x - denoised) / s[i]
        sig, sig_next = f(s[i]), f(s[i + 1])
        abar, abar_prev = f(1) / (sig * sig + f(1)), f(1) / (sig_next * sig_next + f(1))
        alpha = abar / abar_prev
        scale_in = float(f(1) / np.sqrt(f(1) + sig * sig))
        mean_eps = float((f(1) - alpha) / np.sqrt(f(1) - abar))
        x = float(np.sqrt(f(1) / alpha)) * (scale_in * x - mean_eps * eps)
        if s[i + 1] > 0:
            std = float(np.sqrt((f(1) - alpha) * (f(1) - abar_prev) / (f(1) - abar)))
            x = (x + std * next(draws)) * float(np.sqrt(f(1) + sig_next * sig_next))
    return x


def dpmpp_2m_sde_heun(
    model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array], *, first_sigma: float
) -> Array:
    """dpmpp_2m_sde with the Heun correction weight 1 − (1 − e^{−2h})/(2h) (in place of ½(1 − e^{−2h}))."""
    s = _offset_first(s, first_sigma)
    old, h_last = None, None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
            continue
        h = _half_log_snr(s[i + 1]) - _half_log_snr(s[i])
        alpha = 1 - s[i + 1]
        g = 1 - math.exp(-2 * h)
        x = (s[i + 1] / s[i]) * math.exp(-h) * x + alpha * g * denoised
        if old is not None:
            assert h_last is not None
            x = x + alpha * (1 - g / (2 * h)) * (h / h_last) * (denoised - old)
        x = x + s[i + 1] * math.sqrt(g) * noise[i]
        old, h_last = denoised, h
    return x


def er_sde(
    model: RefDenoiser, x: Array, s: Sequence[float], noise: Sequence[Array], *, first_sigma: float
) -> Array:
    """ER-SDE-Solver-3 on λ = σ/(1−σ) with the noise scaler ν(λ) = λ(e^{λ^0.3} + 10): first-order step
    plus the 2nd/3rd-order Taylor terms with 200-point left sums, then √(λ_t² − λ_s² r²)·α_t·z."""
    s = _offset_first(s, first_sigma)

    def nu(v: Array | float) -> Array | float:
        return v * (np.exp(np.power(v, 0.3)) + 10.0)

    lam = [v / (1 - v) for v in s]
    old, old_slope = None, None
    draws = iter(noise)
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
            continue
        ls, lt = lam[i], lam[i + 1]
        a_s, a_t = 1 - s[i], 1 - s[i + 1]
        r = nu(lt) / nu(ls)
        x = (a_t / a_s) * r * x + a_t * (1 - r) * denoised
        if i >= 1:
            dt = lt - ls
            grid = lt - np.arange(200) * dt / 200  # from λ_t back towards λ_s
            step = -dt / 200
            assert old is not None  # the previous step's
            slope = (denoised - old) / (ls - lam[i - 1])
            x = x + a_t * (dt + float(np.sum(1 / nu(grid))) * step * nu(lt)) * slope
            if i >= 2:
                assert old_slope is not None  # the previous step's
                curv = (slope - old_slope) / ((ls - lam[i - 2]) / 2)
                x = x + a_t * (dt**2 / 2 + float(np.sum((grid - ls) / nu(grid))) * step * nu(lt)) * curv
            old_slope = slope
        x = x + a_t * math.sqrt(max(lt**2 - ls**2 * r**2, 0.0)) * next(draws)
        old = denoised
    return x


def seeds(
    model: RefDenoiser,
    x: Array,
    s: Sequence[float],
    noise: Sequence[Array],
    *,
    stages: int,
    first_sigma: float,
) -> Array:
    """SEEDS-2 (r = ½) / SEEDS-3 (r = ⅓, ⅔) in λ = log((1−σ)/σ), η = 1, one continued noise path."""
    s = _offset_first(s, first_sigma)
    draws = iter(noise)

    def phi1(h: float) -> float:  # h·φ₁(h)
        return math.expm1(h)

    def phi2(h: float) -> float:  # h·φ₂(h)
        return (math.expm1(h) - h) / h

    def sig(lam_: float) -> float:
        return _f32(1 / (1 + math.exp(lam_)))

    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
            continue
        ls, lt = _half_log_snr(s[i]), _half_log_snr(s[i + 1])
        h = lt - ls
        a_t = 1 - s[i + 1]
        if stages == 2:
            l1 = ls + h / 2
            s1 = sig(l1)
            x2 = s1 / s[i] * math.exp(-h / 2) * x - (1 - s1) * phi1(-h) * denoised
            w = math.sqrt(-math.expm1(-h)) * next(draws)
            d2 = model(x2 + s1 * w, s1)
            x = s[i + 1] / s[i] * math.exp(-h) * x - a_t * phi1(-2 * h) * d2
            w = w * math.exp(-h / 2) + math.sqrt(-math.expm1(-h)) * next(draws)
            x = x + s[i + 1] * w
            continue
        r1, r2 = 1 / 3, 2 / 3
        s1, s2 = sig(ls + r1 * h), sig(ls + r2 * h)
        x2 = s1 / s[i] * math.exp(-r1 * h) * x - (1 - s1) * phi1(-2 * r1 * h) * denoised
        w = math.sqrt(-math.expm1(-2 * r1 * h)) * next(draws)
        d2 = model(x2 + s1 * w, s1)
        a32 = r2 / r1 * phi2(-2 * r2 * h)
        a31 = phi1(-2 * r2 * h) - a32
        x3 = s2 / s[i] * math.exp(-r2 * h) * x - (1 - s2) * (a31 * denoised + a32 * d2)
        seg = (r1 - r2) * h
        w = w * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * next(draws)
        d3 = model(x3 + s2 * w, s2)
        b3 = phi2(-2 * h) / r2
        b1 = phi1(-2 * h) - b3
        x = s[i + 1] / s[i] * math.exp(-h) * x - a_t * (b1 * denoised + b3 * d3)
        seg = (r2 - 1) * h
        w = w * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * next(draws)
        x = x + s[i + 1] * w
    return x


def _dpm_solver_step(
    model: RefDenoiser, x: Array, t: float, t_next: float, order: int, r1: float = 0.5
) -> Array:
    """One DPM-Solver step (noise prediction, t = −log σ) of order 1, 2 (midpoint at r1) or 3 (r = ⅓, ⅔).
    The model sees e^{−t} rounded to float32, as upstream's float32 time grid hands it over."""

    def eps(xx: Array, tt: float) -> Array:
        sig = _f32(math.exp(-tt))
        return (xx - model(xx, sig)) / math.exp(-tt)

    h = t_next - t
    e0 = eps(x, t)
    if order == 1:
        return x - math.exp(-t_next) * math.expm1(h) * e0
    if order == 2:
        s1 = t + r1 * h
        e1 = eps(x - math.exp(-s1) * math.expm1(r1 * h) * e0, s1)
        return x - math.exp(-t_next) * math.expm1(h) * (e0 + (e1 - e0) / (2 * r1))
    s1, s2 = t + h / 3, t + 2 * h / 3
    e1 = eps(x - math.exp(-s1) * math.expm1(h / 3) * e0, s1)
    u2 = (
        x
        - math.exp(-s2) * math.expm1(2 * h / 3) * e0
        - math.exp(-s2) * 2 * (math.expm1(2 * h / 3) / (2 * h / 3) - 1) * (e1 - e0)
    )
    e2 = eps(u2, s2)
    return x - math.exp(-t_next) * (math.expm1(h) * e0 + 1.5 * (math.expm1(h) / h - 1) * (e2 - e0))


def dpm_fast(model: RefDenoiser, x: Array, s: Sequence[float]) -> Array:
    """NFE = len(s) − 1 spent as third-order steps (+ one of order NFE mod 3, or 2 then 1), uniform in
    t = −log σ from s[0] to the smallest non-zero sigma; the result is the state there."""
    n = len(s) - 1
    lo = s[-1] if s[-1] != 0 else s[-2]
    m = n // 3 + 1
    grid = np.linspace(-math.log(s[0]), -math.log(lo), m + 1).astype(np.float32).astype(float)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        x = _dpm_solver_step(model, x, grid[i], grid[i + 1], order)
    return x


def dpm_adaptive(model: RefDenoiser, x: Array, s: Sequence[float]) -> Array:
    """DPM-Solver-23 with the error-per-step controller h ← h·(1 + atan((1/e)^{1/3} − 1)), accepting
    when that factor is ≥ 0.81; e = RMS of (x₂ − x₃)/max(0.0078, 0.05·max(|x₂|, |x₂,prev|))."""
    lo = s[-1] if s[-1] != 0 else s[-2]
    t, t_end = -math.log(s[0]), -math.log(lo)
    h, x_prev = 0.05, x
    while t < t_end - 1e-5:
        t_next = min(t_end, t + h)
        low = _dpm_solver_step(model, x, t, t_next, 2, r1=1 / 3)
        high = _dpm_solver_step(model, x, t, t_next, 3)
        scale = np.maximum(0.0078, 0.05 * np.maximum(np.abs(low), np.abs(x_prev)))
        err = float(np.sqrt(np.mean(((low - high) / scale) ** 2)))
        factor = 1 + math.atan((1 / (err + 1e-8)) ** (1 / 3) - 1)
        h *= factor
        if factor >= 0.81:
            x_prev, x, t = low, high, t_next
    return x


def _sa_weights(
    nodes: Sequence[float], lam_s: float, lam_t: float, sigma_next: float, tau: float
) -> list[float]:
    """b_k = α_t·(1+τ²)·∫_{λ_s}^{λ_t} e^{(1+τ²)(λ−λ_t)} ℓ_k(λ) dλ by 40-point Gauss–Legendre quadrature
    (exact here: a polynomial times an exponential of a short interval), ℓ_k the Lagrange basis."""
    a = 1 + tau * tau
    z, w = np.polynomial.legendre.leggauss(40)
    lam = (lam_t - lam_s) / 2 * z + (lam_t + lam_s) / 2
    weight = w * (lam_t - lam_s) / 2 * a * np.exp(a * (lam - lam_t))
    out = []
    for k in range(len(nodes)):
        ell = np.prod([(lam - nodes[j]) / (nodes[k] - nodes[j]) for j in range(len(nodes)) if j != k], axis=0)
        out.append(float(np.sum(weight * ell)) * sigma_next * math.exp(lam_t))
    return out


def sa_solver(
    model: RefDenoiser,
    x: Array,
    s: Sequence[float],
    noise: Sequence[Array],
    *,
    first_sigma: float,
    shift: float,
    pece: bool = False,
) -> Array:
    """SA-Solver: Adams predictor of order ≤ 3 and corrector of order ≤ 4 in λ = log((1−σ)/σ), τ = 1 for
    percent_to_sigma(0.8) ≤ σ_next ≤ percent_to_sigma(0.2) else 0, orders lowered towards the end."""
    s = _offset_first(s, first_sigma)
    n = len(s) - 1
    lam = [_half_log_snr(v) if v > 0 else math.inf for v in s]
    hi, lo = percent_to_sigma(0.2, shift, "current"), percent_to_sigma(0.8, shift, "current")
    draws = iter(noise)
    preds: list[Array] = []
    x_pred, tau, h, carried = x, 0.0, 0.0, 0.0 * x
    for i in range(n):
        d = model(x_pred, s[i])
        preds = [*preds, d][-4:]
        p_ord = min(3, len(preds), n - 1 - i)
        c_ord = 0 if i == 0 or (s[i + 1] == 0 and not pece) else min(4, len(preds), n - i)
        if c_ord == 0:
            x = x_pred
        else:
            b = _sa_weights(lam[i - c_ord + 1 : i + 1], lam[i - 1], lam[i], s[i], tau)
            x = s[i] / s[i - 1] * math.exp(-tau * tau * h) * x + sum(
                bk * pk for bk, pk in zip(b, preds[-c_ord:], strict=True)
            )
            x = x + carried if tau > 0 else x
            if pece:
                d = model(x, s[i])
                preds[-1] = d
        if s[i + 1] == 0:
            x = d
            continue
        tau = 1.0 if hi >= s[i + 1] >= lo else 0.0
        b = _sa_weights(lam[i - p_ord + 1 : i + 1], lam[i], lam[i + 1], s[i + 1], tau)
        h = lam[i + 1] - lam[i]
        x_pred = s[i + 1] / s[i] * math.exp(-tau * tau * h) * x + sum(
            bk * pk for bk, pk in zip(b, preds[-p_ord:], strict=True)
        )
        if tau > 0:
            carried = next(draws) * s[i + 1] * math.sqrt(-math.expm1(-2 * h))
            x_pred = x_pred + carried
    return x
