from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch

from schedulers.sigmas import SCHEDULES, percent_to_sigma, sigma_table, sigmas_for, time_shift

# docs/sampling.md §2, N=25, shift 3: first three values … last non-zero value.
GOLDEN = {
    "simple": ([1.0000000, 0.9863013, 0.9718309], 0.1111111),
    "normal": ([1.0, 0.9857583, 0.9706814], 0.0089286),
    "sgm_uniform": ([1.0, 0.9863435, 0.9719201], 0.1184646),
    "karras": ([1.0, 0.8466480, 0.7139116], 0.0029940),
    "exponential": ([1.0, 0.7849534, 0.6161519], 0.0029940),
    "beta": ([1.0, 0.9969820, 0.9908350], 0.0294118),
    "ddim_uniform": ([0.9870042, 0.9725739, 0.9573084], 0.0059761),
    # issue 15. linear_quadratic: 1 − 0.025·i/12 for i < 12, then the parabola; unshifted.
    "linear_quadratic": ([1.0, 0.9979167, 0.9958333], 0.1423077),
    # kl_optimal: tan((1 − i/24)·atan(1) + (i/24)·atan(σ_min)).
    "kl_optimal": ([1.0, 0.9368365, 0.8774180], 0.0029940),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_the_spec_golden_values_at_25_steps_shift_3(schedule: str) -> None:
    sigmas = sigmas_for(schedule, steps=25, shift=3.0)
    first, last = GOLDEN[schedule]
    assert sigmas.dtype == torch.float32
    np.testing.assert_allclose(sigmas[:3].numpy(), first, atol=1e-6)
    assert sigmas[-2].item() == pytest.approx(last, abs=1e-6)
    assert sigmas[-1].item() == 0.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_the_numpy_reference_over_steps_shifts_denoise_and_discard(schedule: str) -> None:
    for steps in (1, 2, 3, 10, 25, 28, 50, 100):
        for shift in (1.0, 3.0, 6.0, 10.0):
            for denoise in (1.0, 0.5, 0.3, 0.1):
                for discard in (False, True):
                    ours = sigmas_for(
                        schedule, steps=steps, shift=shift, denoise=denoise, discard_penultimate=discard
                    )
                    expected = ref.sigmas(schedule, steps, shift, denoise, discard)
                    assert ours.shape == expected.shape, (steps, shift, denoise, discard)
                    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 7, 25, 30, 80, 100])
def test_schedule_is_strictly_decreasing_and_ends_in_zero(schedule: str, steps: int) -> None:
    for discard in (False, True):
        sigmas = sigmas_for(schedule, steps=steps, shift=3.0, discard_penultimate=discard)
        assert sigmas[-1].item() == 0.0
        assert bool((sigmas[1:] < sigmas[:-1]).all())
        assert sigmas[0].item() <= 1.0


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s not in ("beta", "ddim_uniform")])
@pytest.mark.parametrize("steps", [1, 2, 25, 100])
def test_schedule_has_steps_plus_one_values(schedule: str, steps: int) -> None:
    assert len(sigmas_for(schedule, steps=steps, shift=3.0)) == steps + 1
    assert len(sigmas_for(schedule, steps=steps, shift=3.0, discard_penultimate=True)) == steps + 1


@pytest.mark.parametrize(("steps", "actual"), [(7, 8), (30, 31), (80, 84), (25, 25)])
def test_ddim_uniform_step_count_can_differ_from_the_request(steps: int, actual: int) -> None:
    sigmas = sigmas_for("ddim_uniform", steps=steps, shift=3.0)
    assert len(sigmas) - 1 == actual
    assert sigmas[0].item() < 1.0


def test_beta_drops_consecutive_duplicates_so_it_can_have_fewer_steps() -> None:
    assert len(sigmas_for("beta", steps=138, shift=3.0)) - 1 == 138
    sigmas = sigmas_for("beta", steps=139, shift=3.0)
    assert len(sigmas) - 1 < 139
    assert len(set(sigmas.tolist())) == len(sigmas)


@pytest.mark.parametrize("schedule", ["simple", "sgm_uniform", "karras"])
def test_discard_penultimate_plans_one_more_step_and_drops_the_second_to_last_sigma(schedule: str) -> None:
    longer = sigmas_for(schedule, steps=11, shift=3.0)
    discarded = sigmas_for(schedule, steps=10, shift=3.0, discard_penultimate=True)
    assert torch.equal(discarded, torch.cat([longer[:-2], longer[-1:]]))


def test_denoise_half_keeps_the_tail_of_the_doubled_schedule() -> None:
    sigmas = sigmas_for("simple", steps=25, shift=3.0, denoise=0.5)
    assert len(sigmas) == 26
    np.testing.assert_allclose(sigmas[:3].numpy(), [0.75, 0.7346938, 0.7187499], atol=1e-6)
    assert sigmas[-2].item() == pytest.approx(0.0576923, abs=1e-6)
    assert sigmas[-1].item() == 0.0
    assert torch.equal(sigmas, sigmas_for("simple", steps=50, shift=3.0)[-26:])


def test_denoise_above_0_9999_is_the_full_schedule() -> None:
    full = sigmas_for("sgm_uniform", steps=25, shift=3.0)
    assert torch.equal(sigmas_for("sgm_uniform", steps=25, shift=3.0, denoise=0.99995), full)


def test_unknown_schedule_and_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="karras"):
        sigmas_for("polyexponential", steps=25, shift=3.0)
    with pytest.raises(ValueError):
        sigmas_for("simple", steps=0, shift=3.0)
    with pytest.raises(ValueError):
        sigmas_for("simple", steps=10, shift=3.0, denoise=0.0)


def test_sigma_table_spans_shifted_one_thousandth_to_exactly_one() -> None:
    table = sigma_table(3.0)
    assert table.shape == (1000,) and table.dtype == torch.float32
    assert table[-1].item() == 1.0
    assert table[0].item() == pytest.approx(0.0029940, abs=1e-7)
    np.testing.assert_allclose(table.numpy(), ref.table(3.0), atol=2e-7, rtol=0)


def test_time_shift_is_the_identity_at_shift_one_and_inverts_by_formula() -> None:
    t = torch.linspace(0, 1, 11)
    assert torch.equal(time_shift(t, 1.0), t)
    shift = 3.0
    for value in (0.0, 0.1, 0.5, 0.9, 1.0):
        sigma = time_shift(value, shift)
        assert sigma / (shift - (shift - 1) * sigma) == pytest.approx(value)


def test_percent_to_sigma_current_rule_is_shifted_and_legacy_is_not() -> None:
    assert percent_to_sigma(0.1, shift=3.0, rule="current") == pytest.approx(0.9642857, abs=1e-7)
    assert percent_to_sigma(0.1, shift=3.0, rule="legacy") == pytest.approx(0.9)
    for rule in ("current", "legacy"):
        assert percent_to_sigma(0.0, shift=3.0, rule=rule) == 1.0
        assert percent_to_sigma(-0.5, shift=3.0, rule=rule) == 1.0
        assert percent_to_sigma(1.0, shift=3.0, rule=rule) == 0.0
    assert math.isclose(percent_to_sigma(1e-4, shift=3.0, rule="current"), time_shift(0.9999, 3.0))
    with pytest.raises(ValueError):
        percent_to_sigma(0.5, shift=3.0, rule="newest")
