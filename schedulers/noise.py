"""Initial and per-step noise, drawn exactly as ComfyUI draws it so that a seed means the same image."""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The start noise for the whole batch: one float32 CPU draw, so item k is not the image of seed+k."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator)


class NoiseSource(Protocol):
    """Per-step noise for stochastic samplers: a unit-variance sample for the step sigma → sigma_next."""

    def __call__(self, sigma: float, sigma_next: float, like: torch.Tensor) -> torch.Tensor: ...


class AncestralNoise:
    """ComfyUI's ancestral noise since 2025-01-06: a dedicated generator on the state's device, one
    float32 `randn` of the whole batch per noisy step (sigmas are ignored)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def __call__(self, sigma: float, sigma_next: float, like: torch.Tensor) -> torch.Tensor:
        if self._generator is None:
            # Created on first use because only then is the state's device known. On CPU the seed is
            # offset so the stream does not repeat the initial noise drawn from the same seed.
            seed = self.seed + 1 if like.device.type == "cpu" else self.seed
            self._generator = torch.Generator(like.device).manual_seed(seed)
        return torch.randn(like.shape, dtype=torch.float32, device=like.device, generator=self._generator)


class BrownianTreeNoise:
    """Brownian-tree noise for SDE samplers: (W(σ_next) − W(σ)) / sqrt|σ_next − σ| from one torchsde
    tree over [sigma_min, sigma_max] for the whole batch, seeded with `seed`. Built on CPU, or with
    `on_device` on `like`'s device as upstream's `_gpu` samplers do (there torchsde draws from that
    device's generator, so a CUDA tree is a different stream from the CPU one)."""

    def __init__(
        self, seed: int, sigma_min: float, sigma_max: float, like: torch.Tensor, *, on_device: bool = False
    ) -> None:
        if not 0.0 < sigma_min <= sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
        self.seed = seed
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.shape = tuple(like.shape)
        self.device = like.device if on_device else torch.device("cpu")
        self._tree: Any = None

    def __call__(self, sigma: float, sigma_next: float, like: torch.Tensor) -> torch.Tensor:
        if self._tree is None:
            # Built on first use: a one-step schedule never queries (and has sigma_min == sigma_max).
            self._tree = self._build()
        low, high = (
            torch.tensor(value, dtype=torch.float32, device=self.device)
            for value in sorted((sigma, sigma_next))
        )
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to its 1e-6 tolerance, so a query at the exact sigma_min
            # lands a hair outside and is clamped to the end, exactly as upstream; the warning is noise.
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            increment: torch.Tensor = self._tree(low, high)
        # The tree answers W(high) − W(low); sampling runs from high to low sigma, so flip the sign.
        sign = -1.0 if sigma_next < sigma else 1.0
        return (sign * increment / (high - low).sqrt()).to(device=like.device, dtype=torch.float32)

    def _build(self) -> Any:
        import torchsde  # lazy: only SDE samplers need it

        start = torch.tensor(self.sigma_min, dtype=torch.float32, device=self.device)
        end = torch.tensor(self.sigma_max, dtype=torch.float32, device=self.device)
        origin = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        return torchsde.BrownianTree(start, origin, end, entropy=self.seed)
