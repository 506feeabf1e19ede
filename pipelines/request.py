"""The only types `server/` shares with `pipelines/`: what to generate, and what came out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from schedulers import sigmas_for
from schedulers.names import SchedulerSpec, resolve


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One job, in the units of the public API (docs/contract.md §1.1, docs/sampling.md).

    txt2img starts from an empty latent; img2img (`init_image` set) from the VAE encoding of that
    image, with `denoise` as its strength (docs/sampling.md, img2img).
    """

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
    # False: the negative prompt guides every step (plain CFG), and cond_start/cond_stop are unused;
    # the SD3.5 pages have no window fields (docs/contract.md §8).
    negative_window: bool = True
    # Who may reuse this request's encoded prompts: the prompt cache is partitioned by it, so that
    # one client's timings cannot tell whether another sent the same prompt recently. The server
    # passes the API key; "" shares with every other unscoped request.
    cache_scope: str = ""
    # The sigma schedule, when it is named apart from the sampler (the img2img page's `sampler` +
    # `scheduler` fields): overrides the schedule that `scheduler`'s name implies.
    schedule: str | None = None
    # img2img: the input image, HxWx3 uint8. `width`/`height` must be its size after the crop to a
    # multiple of 8 (pipelines/img2img.py `cropped_size`), which is the output size.
    init_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    # The opt-in step cache's level (pipelines/step_cache.py): "off" is the exact loop.
    step_cache: str = "off"

    def sampling_spec(self) -> SchedulerSpec:
        """The sampler, schedule and guidance factor this request runs."""
        spec = resolve(self.scheduler)
        return spec if self.schedule is None else replace(spec, schedule=self.schedule)

    def sigmas(self) -> torch.Tensor:
        """The sigmas this request samples down (float32, on the CPU): the generator runs them and the
        price in evaluations counts them, so both follow the same schedule."""
        spec = self.sampling_spec()
        if self.init_image is not None and self.denoise <= 0.0:
            # KSampler's set_steps: no denoise, no sigmas (docs/sampling.md, img2img).
            return torch.zeros(0, dtype=torch.float32)
        return sigmas_for(
            spec.schedule, self.steps, shift=self.shift, denoise=self.denoise, sampler=spec.sampler
        )


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    images: list[np.ndarray]  # one HxWx3 uint8 array per sample, in batch order
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, sample, decode


class GenerationCancelled(Exception):
    """Raised from a step callback to stop a job at the next step."""
