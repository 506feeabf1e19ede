from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from reference import Toy
from torch_toy import start_latent, torch_predict

from schedulers.guidance import CondRange, guided_denoiser, negative_ranges
from schedulers.samplers import DISCARD_PENULTIMATE, SAMPLERS
from schedulers.sigmas import sigmas_for


def evaluations(
    toy: Toy,
    *,
    sampler: str = "euler",
    schedule: str,
    steps: int,
    shift: float = 3.0,
    rule: str = "current",
    start: float = 0.1,
    stop: float = 1.0,
    wiring: str = "a",
    cfg: float = 5.0,
) -> list[tuple[float, tuple[str, ...]]]:
    """(σ, active negatives) for every denoiser evaluation of one sampling run."""
    log: list[tuple[float, tuple[str, ...]]] = []
    ranges = negative_ranges(start=start, stop=stop, shift=shift, wiring=wiring, rule=rule)
    denoiser = guided_denoiser(torch_predict(toy, log), cfg=cfg, ranges=ranges)
    sigmas = sigmas_for(
        schedule, steps=steps, shift=shift, discard_penultimate=sampler in DISCARD_PENULTIMATE
    )
    SAMPLERS[sampler](denoiser, torch.from_numpy(start_latent(1, float(sigmas[0]))).float(), sigmas)
    return log


# docs/sampling.md §5.2: how many evaluations see the real negative (shift 3, defaults 0.1 / 1.0).
@pytest.mark.parametrize(
    ("schedule", "steps", "current", "legacy"),
    [
        ("simple", 25, 3, 7),
        ("sgm_uniform", 25, 3, 7),
        ("normal", 25, 3, 7),
        ("karras", 25, 1, 1),
        ("beta", 25, 5, 8),
        ("simple", 28, 3, 8),
        ("simple", 50, 5, 13),
        ("sgm_uniform", 50, 6, 13),
        ("normal", 50, 5, 13),
    ],
)
def test_real_negative_is_active_for_the_spec_step_counts(
    toy: Toy, schedule: str, steps: int, current: int, legacy: int
) -> None:
    for rule, expected in (("current", current), ("legacy", legacy)):
        log = evaluations(toy, schedule=schedule, steps=steps, rule=rule)
        assert sum("negative" in names for _, names in log) == expected, rule
        # Outside the real negative's range the zero negative takes over; no gaps at the defaults.
        assert all(names for _, names in log)


def test_legacy_rule_at_28_steps_ties_on_step_7(toy: Toy) -> None:
    log = evaluations(toy, schedule="simple", steps=28, rule="legacy")
    assert log[7][1] == ("negative", "zero")
    assert [i for i, (_, names) in enumerate(log) if len(names) == 2] == [7]


def test_a_tie_averages_the_real_and_zero_negative(toy: Toy) -> None:
    log = evaluations(toy, schedule="simple", steps=50, shift=1.0)
    sigma, names = log[5]
    assert np.float32(sigma) == np.float32(0.9) and names == ("negative", "zero")

    ranges = negative_ranges(start=0.1, stop=1.0, shift=1.0, wiring="a", rule="current")
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=ranges)
    x = torch.from_numpy(start_latent(2, sigma)).float()
    x64 = x.double().numpy()
    cond = toy.denoised(x64, sigma, "positive")
    uncond = (toy.denoised(x64, sigma, "negative") + toy.denoised(x64, sigma, "zero")) / 2
    np.testing.assert_allclose(denoiser(x, sigma).numpy(), uncond + 5.0 * (cond - uncond), atol=1e-5)


def test_a_gap_in_the_window_gives_cfg_times_the_conditional(toy: Toy) -> None:
    # Wiring A with start 0.3: nothing is active between percent 0.1 and 0.3; stop 0.5: nothing after 0.5.
    ranges = negative_ranges(start=0.3, stop=0.5, shift=3.0, wiring="a", rule="current")
    log = evaluations(toy, schedule="sgm_uniform", steps=25, start=0.3, stop=0.5)
    gaps = [sigma for sigma, names in log if not names]
    assert len(gaps) > 5
    denoiser = guided_denoiser(torch_predict(toy), cfg=5.0, ranges=ranges)
    for sigma in gaps:
        x = torch.from_numpy(start_latent(1, sigma)).float()
        expected = 5.0 * toy.denoised(x.double().numpy(), sigma, "positive")
        np.testing.assert_allclose(denoiser(x, sigma).numpy(), expected, atol=1e-5)


def test_start_after_stop_leaves_no_zero_negative(toy: Toy) -> None:
    log = evaluations(toy, schedule="sgm_uniform", steps=25, start=0.8, stop=0.4)
    assert all("zero" not in names for _, names in log)


def test_cfg_one_never_evaluates_an_uncond(toy: Toy) -> None:
    calls: list[tuple[str, ...]] = []
    predict = torch_predict(toy)

    def recording(x: torch.Tensor, sigma: float, names: tuple[str, ...]) -> list[torch.Tensor]:
        calls.append(names)
        return predict(x, sigma, names)

    ranges = negative_ranges(start=0.1, stop=1.0, shift=3.0, wiring="a", rule="current")
    denoiser = guided_denoiser(recording, cfg=1.0, ranges=ranges)
    sigmas = sigmas_for("sgm_uniform", steps=10, shift=3.0)
    SAMPLERS["heun"](denoiser, torch.from_numpy(start_latent(1, 1.0)).float(), sigmas)
    assert calls and all(names == ("positive",) for names in calls)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "lms", "dpmpp_2m", "euler"])
@pytest.mark.parametrize("rule", ["current", "legacy"])
def test_selection_per_evaluation_matches_the_reference_including_intermediate_sigmas(
    toy: Toy, sampler: str, rule: str
) -> None:
    ours = evaluations(toy, sampler=sampler, schedule="simple", steps=28, rule=rule)
    ref_log: list = []
    model = toy.guided(cfg=5.0, ranges=ref.windows(0.1, 1.0, 3.0, "a", rule), log=ref_log)
    discard = sampler in DISCARD_PENULTIMATE
    values = [float(s) for s in sigmas_for("simple", steps=28, shift=3.0, discard_penultimate=discard)]
    reference = {
        "heun": ref.heun,
        "dpm_2": ref.dpm_2,
        "lms": ref.lms,
        "dpmpp_2m": ref.dpmpp_2m,
        "euler": ref.euler,
    }[sampler]
    reference(model, start_latent(1, values[0]), values)
    assert [names for _, names in ours] == [names for _, names in ref_log]
    np.testing.assert_allclose([s for s, _ in ours], [s for s, _ in ref_log], rtol=1e-7)


def test_cfg_on_velocity_equals_cfg_on_denoised() -> None:
    generator = torch.Generator().manual_seed(0)
    # float64 so the check is of the algebra, not of float32 rounding on cfg-amplified values.
    x, v_cond, v_uncond = (
        torch.randn(2, 4, 6, 6, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    sigma, cfg = 0.7, 4.5

    def predict(x: torch.Tensor, sigma: float, names: tuple[str, ...]) -> list[torch.Tensor]:
        return [x - sigma * (v_cond if name == "positive" else v_uncond) for name in names]

    ranges = (CondRange("negative", sigma_start=1.0, sigma_end=0.0),)
    on_denoised = guided_denoiser(predict, cfg=cfg, ranges=ranges)(x, sigma)
    on_velocity = x - sigma * (v_uncond + cfg * (v_cond - v_uncond))
    torch.testing.assert_close(on_denoised, on_velocity, atol=1e-10, rtol=0)


def test_negative_ranges_follow_the_wiring_and_rule() -> None:
    a = negative_ranges(start=0.4, stop=0.9, shift=3.0, wiring="a", rule="current")
    assert [r.name for r in a] == ["negative", "zero"]
    assert a[0].sigma_start == 1.0 and a[0].sigma_end == pytest.approx(0.9642857, abs=1e-7)
    assert a[1].sigma_start == pytest.approx(3 * 0.6 / 2.2) and a[1].sigma_end == pytest.approx(0.3 / 1.2)
    b = negative_ranges(start=0.4, stop=1.0, shift=3.0, wiring="b", rule="legacy")
    assert (b[0].sigma_start, b[0].sigma_end) == (1.0, pytest.approx(0.6))
    assert (b[1].sigma_start, b[1].sigma_end) == (pytest.approx(0.6), 0.0)
    with pytest.raises(ValueError):
        negative_ranges(start=0.1, stop=1.0, shift=3.0, wiring="c", rule="current")


def test_range_bounds_are_closed_and_compared_in_float32() -> None:
    entry = CondRange("zero", sigma_start=0.9, sigma_end=0.25)
    assert entry.active(0.9) and entry.active(float(np.float32(0.9))) and entry.active(0.25)
    assert not entry.active(float(np.nextafter(np.float32(0.9), np.float32(1))))
    assert not entry.active(0.2499)
