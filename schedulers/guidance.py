"""Classifier-free guidance and the SD3 negative-prompt timestep window (ComfyUI semantics).

The negative side is a list of conditioning entries, each active on a closed sigma interval; every
denoiser evaluation picks the entries active at *its own* sigma, averages their predictions, and uses a
zero uncond prediction when none is active.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from schedulers.sigmas import percent_to_sigma, to_float32

Predict = Callable[[torch.Tensor, float, tuple[str, ...]], list[torch.Tensor]]
"""predict(x, σ, names) → the denoised prediction for each named conditioning, in order."""

POSITIVE = "positive"
NEGATIVE = "negative"
ZERO_NEGATIVE = "zero"


@dataclass(frozen=True)
class CondRange:
    """A conditioning entry active for sigma_end ≤ σ ≤ sigma_start (both ends closed)."""

    name: str
    sigma_start: float
    sigma_end: float

    def active(self, sigma: float) -> bool:
        # Upstream compares a float32 sigma with the thresholds in float32, so a schedule sigma equal
        # to a threshold's float32 value is inside both neighbouring ranges (a tie).
        value = to_float32(sigma)
        return to_float32(self.sigma_end) <= value <= to_float32(self.sigma_start)


def negative_ranges(
    *, start: float, stop: float, shift: float, wiring: str, rule: str
) -> tuple[CondRange, ...]:
    """The real negative and the zeroed-out negative of the SD3 workflow, from the API's percents.

    wiring "a": the real negative keeps its workflow range [0, 0.1] and the zero negative gets
    [start, stop]; wiring "b": the real negative gets [0, start]. Percent 0 is the start of sampling.
    """
    if wiring == "a":
        negative_until = 0.1
    elif wiring == "b":
        negative_until = start
    else:
        raise ValueError(f"unknown negative-window wiring {wiring!r}: expected 'a' or 'b'")

    def to_sigma(percent: float) -> float:
        return percent_to_sigma(percent, shift=shift, rule=rule)

    return (
        CondRange(NEGATIVE, sigma_start=to_sigma(0.0), sigma_end=to_sigma(negative_until)),
        CondRange(ZERO_NEGATIVE, sigma_start=to_sigma(start), sigma_end=to_sigma(stop)),
    )


def plain_negative() -> tuple[CondRange, ...]:
    """The real negative on every sigma: plain CFG, with no window and no zeroed-out negative."""
    return (CondRange(NEGATIVE, sigma_start=math.inf, sigma_end=0.0),)


class GuidedDenoiser:
    """D = D_u + cfg·(D_c − D_u), with D_u the mean of the negatives active at σ, or 0 in a gap.

    Calling it gives D; at cfg = 1 only the positive is evaluated, as upstream skips the uncond pass
    entirely. `with_uncond` gives (D, D_u) for the CFG++ samplers: upstream registers them with the cfg-1
    shortcut disabled, so the negatives are evaluated at every guidance, cfg 1 included.
    """

    def __init__(self, predict: Predict, *, cfg: float, ranges: tuple[CondRange, ...]) -> None:
        self.predict = predict
        self.cfg = cfg
        self.ranges = ranges
        self._skip_uncond = math.isclose(cfg, 1.0)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if self._skip_uncond:
            return self.predict(x, sigma, (POSITIVE,))[0]
        return self.with_uncond(x, sigma)[0]

    def with_uncond(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        negatives = tuple(entry.name for entry in self.ranges if entry.active(sigma))
        cond, *uncond_parts = self.predict(x, sigma, (POSITIVE, *negatives))
        if not uncond_parts:
            # A gap: upstream's uncond is 0, so D = cfg·D_c bit for bit.
            return self.cfg * cond, torch.zeros_like(cond)
        uncond = uncond_parts[0]
        if len(uncond_parts) > 1:  # x / 1 is x bit for bit: skip a full-latent op on most steps
            for part in uncond_parts[1:]:
                uncond = uncond + part
            uncond = uncond / len(uncond_parts)
        return uncond + self.cfg * (cond - uncond), uncond


def guided_denoiser(predict: Predict, *, cfg: float, ranges: tuple[CondRange, ...]) -> GuidedDenoiser:
    """The CFG-combined denoiser of one request (see `GuidedDenoiser`)."""
    return GuidedDenoiser(predict, cfg=cfg, ranges=ranges)
