"""The only types `server/` shares with `pipelines/`: what to generate, and what came out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One txt2img job, in the units of the public API (docs/contract.md §1.1, docs/sampling.md)."""

    prompt: str
    negative_prompt: str = ""
    samples: int = 1
    scheduler: str = "DPM++ 2M"
    steps: int = 25
    guidance_scale: float = 5.0
    denoise: float = 1.0
    seed: int = 0  # already resolved: -1 ("random") is drawn by the caller, who reports it
    width: int = 1024
    height: int = 1024
    shift: float = 3.0
    cond_start: float = 0.1  # conditioningsettimesteprange_start
    cond_stop: float = 1.0  # conditioningsettimesteprange_stop
    # Who may reuse this request's encoded prompts: the prompt cache is partitioned by it, so that
    # one client's timings cannot tell whether another sent the same prompt recently. The server
    # passes the API key; "" shares with every other unscoped request.
    cache_scope: str = ""


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    images: list[np.ndarray]  # one HxWx3 uint8 array per sample, in batch order
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, sample, decode


class GenerationCancelled(Exception):
    """Raised from a step callback to stop a job at the next step."""
