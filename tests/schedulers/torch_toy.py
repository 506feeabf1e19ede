"""The reference's toy model seen from the torch side: the pipeline-shaped predict(x, σ, names)."""

from __future__ import annotations

import numpy as np
import torch
from reference import Toy

from schedulers.guidance import Predict


def torch_predict(toy: Toy, log: list | None = None) -> Predict:
    """Per-name float32 denoised predictions, like the transformer output; logs (σ, negatives)."""

    def predict(x: torch.Tensor, sigma: float, names: tuple[str, ...]) -> list[torch.Tensor]:
        assert type(sigma) is float
        assert x.dtype == torch.float32
        if log is not None:
            log.append((sigma, names[1:]))
        x64 = x.double().numpy()
        return [torch.from_numpy(toy.denoised(x64, sigma, n)).float() for n in names]

    return predict


def start_latent(batch: int, sigma0: float, seed: int = 3) -> np.ndarray:
    """σ0·noise in float32, returned as float64 so both sides start from identical values."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((batch, 4, 6, 6), dtype=torch.float32, generator=generator)
    return (sigma0 * noise).numpy().astype(np.float64)
