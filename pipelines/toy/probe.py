"""Where the toy decides what it draws: the judge on the transformer's one-step estimate of the clean
image from a real render noised to σ.

At a small σ the noised render still shows everything, and the estimate reads right whatever the
model learnt. Near σ = 1 only the caption says what to draw. So the σ at which an attribute stops
being read right is where sampling must already have committed to it, from the caption alone; and
a larger image commits at a higher σ, because more pixels average the same noise away. That is
where a training run has to spend its steps (docs/toy.md §12).

Unlike `pipelines/toy/quality.py`, which measures only what a client receives, this reads the model's
internals: the same forward and the same x_t = (1 − σ)·x0 + σ·ε as training (`pipelines.toy.train`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipelines.toy import quality, world
from pipelines.toy.train import velocity
from schedulers.noise import initial_noise

if TYPE_CHECKING:
    from pipelines.sd3 import SD3Generator

PROBE_SIGMAS = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95)


def scenes_for(
    pairs: Sequence[tuple[world.Caption, int]], *, unpositioned_scale: float = 1.0
) -> list[world.Scene]:
    """A layout for each (caption, seed) pair, drawn from the pair's own seed, in the world whose
    unpositioned shapes are `unpositioned_scale` times as large (`world.scene_for`)."""
    return [
        world.scene_for(caption, np.random.default_rng([seed, 11]), unpositioned_scale=unpositioned_scale)
        for caption, seed in pairs
    ]


@torch.no_grad()
def readable_at(
    generator: SD3Generator,
    pairs: Sequence[tuple[world.Caption, int]],
    sigmas: Sequence[float] = PROBE_SIGMAS,
    *,
    size: int,
    unpositioned_scale: float = 1.0,
) -> dict[float, quality.Adherence]:
    """Per σ, the judge's reading of each pair's one-step estimate of x0, against its caption. The
    renders are of the world the model was trained on: pass its `unpositioned_scale`
    (`pipelines.toy.train.trained_unpositioned_scale`).

    Each pair's render is noised with the pair's own noise (seeded by its seed), the same noise at
    every σ, so the rows differ only by how much of the render the noise hides.
    """
    transformer = generator.pipe.transformer
    dtype = next(transformer.parameters()).dtype
    estimates: dict[float, list[np.ndarray]] = {float(s): [] for s in sigmas}
    for scene, (caption, seed) in zip(
        scenes_for(pairs, unpositioned_scale=unpositioned_scale), pairs, strict=True
    ):
        x0 = generator.encode_image(world.render(scene, size))
        noise = initial_noise(seed, tuple(x0.shape)).to(x0.device)
        cond = generator.encode(caption.text)
        for sigma in estimates:
            x_t = (1.0 - sigma) * x0 + sigma * noise
            step = torch.full((1,), sigma, device=x0.device)
            v = velocity(transformer, x_t.to(dtype), step, cond.context, cond.pooled).float()
            estimates[sigma] += generator.decode(x_t - sigma * v)
    return {sigma: quality.adherence_of(pairs, images) for sigma, images in estimates.items()}
